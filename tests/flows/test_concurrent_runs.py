"""Runs that start together on a store nobody has used yet: every one of them ends FINISHED."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("runs", [2, 4])
def test_concurrent_first_runs_on_a_new_sqlite_store_all_finish(
    runs: int,
    write_config: Callable[..., Path],
    cancer_data: Path,
    xgb_model: Path,
    tmp_path: Path,
) -> None:
    from prefect.settings import PREFECT_API_URL

    store = tmp_path / "fresh" / "mlflow.db"
    assert not store.exists()
    configs = [
        write_config(
            model={"name": f"cancer-{n}", "kind": "xgboost", "path": str(xgb_model)},
            data={"source": str(cancer_data), "target": "malignant", "explain_rows": 20},
            output={"plots": []},
        )
        for n in range(runs)
    ]
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "MLFLOW_TRACKING_URI": f"sqlite:///{store}",
        "SHAPLINE_CACHE_DIR": str(tmp_path / "cache"),
    }
    started = [
        subprocess.Popen(
            [str(BIN / "shapline"), "run", str(config), "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for config in configs
    ]
    results = [process.communicate(timeout=300) for process in started]
    for process, (_, err) in zip(started, results, strict=True):
        assert process.returncode == 0, err[-3000:]
    ids = {json.loads(out.strip().splitlines()[-1])["mlflow_run_id"] for out, _ in results}
    client = MlflowClient(f"sqlite:///{store}")
    statuses = [client.get_run(run_id).info.status for run_id in ids]
    assert len(ids) == runs and statuses == ["FINISHED"] * runs
