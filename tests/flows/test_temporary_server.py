"""The temporary Prefect server a run starts without PREFECT_API_URL: what it records outlives it."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import flow_run_of, own_server_env

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def test_a_temporary_server_records_every_task_run_before_it_stops(
    write_config: Callable[..., Path], cancer_data: Path, xgb_model: Path, tmp_path: Path
) -> None:
    """Its task run recorder writes in batches flushed every 5 s (flows/cli.py's PREFECT_SERVER_DEFAULTS), so
    the last task runs of a run are still unwritten when the run ends: the server, stopped as the CLI exits,
    writes them first. Its database (what `prefect server start` on the same PREFECT_HOME shows) has every
    shard task run of the flow run, each in its final state."""
    config = write_config(
        model={"name": "cancer", "kind": "xgboost", "path": str(xgb_model)},
        data={"source": str(cancer_data), "target": "malignant", "explain_rows": 12},
        explainer={"nsamples": 100},
        shards={"size": 4},
        output={"plots": []},
    )
    env = own_server_env(tmp_path)
    done = subprocess.run(
        [str(BIN / "shapline"), "run", str(config), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    flow_run = flow_run_of(env["MLFLOW_TRACKING_URI"], summary)
    with sqlite3.connect(Path(env["PREFECT_HOME"]) / "prefect.db") as database:
        recorded = database.execute(
            "SELECT name, state_type FROM task_run WHERE flow_run_id = ? AND name LIKE 'explain-shard-%'",
            (flow_run,),
        ).fetchall()
    assert sorted(recorded) == [(f"explain-shard-{n}", "COMPLETED") for n in range(3)]
