"""Helpers the end-to-end tests share: run the CLI in-process, read what a run logged."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any], str]:
    """Exit code, the JSON object on stdout's last line, and stderr of `shapline ARGS`."""
    code = main(args)
    out, err = capsys.readouterr()
    last = out.strip().splitlines()[-1] if out.strip() else "{}"
    return code, json.loads(last), err


def all_runs(uri: str) -> list[Any]:
    """Every MLflow run in the store, in every experiment."""
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []


def artifact(uri: str, run_id: str, name: str, folder: Path) -> Path:
    """Download one artifact of a run into `folder`."""
    return Path(MlflowClient(uri).download_artifacts(run_id, name, str(folder)))


def logged_values(uri: str, run_id: str, folder: Path) -> pd.DataFrame:
    """The run's shap_values.parquet."""
    return pd.read_parquet(artifact(uri, run_id, "shap_values.parquet", folder))


class DiesOnceInAWorker:
    """A classifier whose first predict in a worker process kills that process, as an OOM kill would."""

    def __init__(self, model: Any, marker: str) -> None:
        self.model = model
        self.marker = marker
        self.classes_ = model.classes_

    def fit(self, rows: Any, target: Any) -> DiesOnceInAWorker:
        self.model.fit(rows, target)
        return self

    def predict_proba(self, rows: Any) -> Any:
        import multiprocessing
        import os

        if multiprocessing.parent_process() is not None and not Path(self.marker).exists():
            Path(self.marker).touch()
            os._exit(9)
        return self.model.predict_proba(rows)


def free_port() -> int:
    """A TCP port on loopback nobody listens on (yet)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
