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
