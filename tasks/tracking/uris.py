"""Where MLflow is, as text: the tracking URI a run uses, what kind of store it names. Imports no MLflow."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_tracking_uri(configured: str | None) -> str:
    """output.tracking_uri, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working folder."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def sqlite_database(tracking_uri: str) -> Path | None:
    """The database file of a sqlite:/// tracking URI (also in SQLite's URI form file:...?mode=...)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(database.removeprefix("file:"))


def is_http(uri: str) -> bool:
    """Whether a URI names a server a person opens in a browser (http:// or https://)."""
    return uri.startswith(("http://", "https://"))


# MLflow 3.17's UI picks an experiment's view from a GenAI / model-training switch kept per browser
# (default GenAI), not from the experiment's kind; the links shapline writes ask for model training.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"
# Where `mlflow ui` serves a local store, unless told another port.
LOCAL_UI = "http://127.0.0.1:5000"


def run_page(tracking_uri: str, experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """The page of a run (or of one of its artifacts): an MLflow server's own URL; for a local store, the
    page `mlflow ui --backend-store-uri <store>` serves (`open_hint` says so beside it)."""
    base = tracking_uri.rstrip("/") if is_http(tracking_uri) else LOCAL_UI
    page = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{page}/artifacts/{artifact}" if artifact else f"{page}?{MODEL_TRAINING_VIEW}"


def open_hint(tracking_uri: str) -> str:
    """What a person runs before a local store's pages open (`mlflow ui ...`); nothing for a server."""
    return "" if is_http(tracking_uri) else f"mlflow ui --backend-store-uri {tracking_uri}"
