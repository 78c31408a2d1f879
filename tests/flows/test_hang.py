"""A model that never returns: a shard gives up after shards.timeout_s and the run fails naming it, with
every finished shard kept; SIGTERM ends a run stuck in the model FAILED, and the process with it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import Hangs, all_runs, run_cli, shard_task_runs

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]
BIN = Path(sys.executable).parent
TIMEOUT_LINE = (
    r"shapline: error: shard 1 \(rows \d+-\d+\): no result within shards.timeout_s = 2 s "
    r"\(the model did not return\); raise shards.timeout_s for slow models"
)


def hanging_config(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    tmp_path: Path,
    runner: str,
    after_shards: int,
    **shards: Any,
) -> Path:
    """Two shards of two rows, one after the other; the model hangs in a shard once `after_shards` are in."""
    markers = tmp_path / "markers"
    markers.mkdir(exist_ok=True)
    model = tmp_path / f"hangs-{runner}.joblib"
    store = os.environ["SHAPLINE_CACHE_DIR"]
    joblib.dump(Hangs(joblib.load(mlp_model), str(markers), store, after_shards), model)
    return write_config(
        model={"name": f"cancer-hangs-{runner}", "kind": "sklearn", "path": str(model)},
        data={"source": str(cancer_data), "target": "malignant", "explain_rows": 4, "seed": 2},
        background={"size": 8},
        explainer={"algorithm": "kernel", "nsamples": 40, "seed": 7},
        shards={"size": 2, "runner": runner, "workers": 1, **shards},
        output={"plots": []},
    )


def cli_env() -> dict[str, str]:
    """The test's environment for a `shapline` subprocess, on the session's Prefect server (no server of its
    own to start) with tests.helpers importable (the pickled model's class)."""
    from prefect.settings import PREFECT_API_URL

    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONPATH": root}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("shapline: error:")]


def finished_shards() -> list[str]:
    return sorted(
        p.name.split("-")[1] for p in Path(os.environ["SHAPLINE_CACHE_DIR"]).rglob("shard-*.parquet")
    )


def test_a_shard_that_never_returns_on_a_thread_fails_the_run_after_its_retries_and_the_process_exits(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    mlflow_store: str,
    tmp_path: Path,
) -> None:
    """The thread runner abandons the stuck thread (a daemon): the retries happen, the run fails with one
    line, and the process ends although four threads still sleep in the model."""
    config = hanging_config(
        write_config, cancer_data, mlp_model, tmp_path, "thread", after_shards=1, timeout_s=2
    )
    started = time.monotonic()
    done = subprocess.run(
        [str(BIN / "shapline"), "run", str(config), "--json"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    took = time.monotonic() - started
    assert done.returncode == 1, done.stderr[-3000:]
    [line] = error_lines(done.stderr)
    assert re.fullmatch(TIMEOUT_LINE, line), line
    assert "Traceback" not in done.stderr
    # Four tries (three retries), each on another thread (a stuck one takes no more shards), left hanging.
    hanging = sorted(p.name for p in (tmp_path / "markers").iterdir())
    threads = {name.rsplit("-", 1)[0] for name in hanging}
    assert len(hanging) == 4 and len(threads) == 4 and all("-shapline-shard-" in t for t in threads), hanging
    [run] = all_runs(mlflow_store)
    assert run.info.status == "FAILED"
    assert "no result within shards.timeout_s = 2 s" in run.data.tags["shapline.error"]
    counts = [r.run_count for r in shard_task_runs(run.data.tags["prefect.flow_run_id"], 2)]
    assert counts == [1, 4], counts
    assert finished_shards() == ["000000"], "the finished shard stays in the store"
    assert took < 300, f"{took:.0f} s"
    print(f"thread runner: failed after its retries in {took:.1f} s")


def test_a_shard_that_never_returns_in_a_pool_worker_gets_a_fresh_worker_for_each_retry(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The process runner kills the stuck worker and replaces the pool: each try hangs in another process,
    and none of them is left running."""
    config = hanging_config(
        write_config, cancer_data, mlp_model, tmp_path, "process", after_shards=1, timeout_s=2
    )
    started = time.monotonic()
    code, summary, err = run_cli(["run", str(config), "--json"], capsys)
    took = time.monotonic() - started
    assert code == 1, err[-3000:]
    [line] = error_lines(err)
    assert re.fullmatch(TIMEOUT_LINE, line), line
    assert summary["status"] == "FAILED" and summary["error"] == line.removeprefix("shapline: error: ")
    hanging = [p.name for p in (tmp_path / "markers").iterdir()]
    pids = {int(name.split("-")[1]) for name in hanging}
    assert len(hanging) == 4 and len(pids) == 4, hanging
    deadline = time.monotonic() + 30
    while (alive := [pid for pid in pids if psutil.pid_exists(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, "a worker stuck in the model was left running"
    [run] = all_runs(mlflow_store)
    assert run.info.status == "FAILED"
    assert "no result within shards.timeout_s = 2 s" in run.data.tags["shapline.error"]
    counts = [r.run_count for r in shard_task_runs(run.data.tags["prefect.flow_run_id"], 2)]
    assert counts == [1, 4], counts
    assert finished_shards() == ["000000"], "the finished shard stays in the store"
    assert took < 300, f"{took:.0f} s"
    print(f"process runner: failed after its retries in {took:.1f} s")


@pytest.mark.parametrize("runner", ["thread", "process"])
def test_sigterm_ends_a_run_stuck_in_the_model_failed_and_the_process_with_it(
    runner: str,
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    mlflow_store: str,
    tmp_path: Path,
) -> None:
    config = hanging_config(write_config, cancer_data, mlp_model, tmp_path, runner, after_shards=0)
    run = subprocess.Popen(
        [str(BIN / "shapline"), "run", str(config), "--json"],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    markers = tmp_path / "markers"
    deadline = time.monotonic() + 240
    while not any(markers.iterdir()) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    [hanging] = [p.name for p in markers.iterdir()]
    if runner == "thread":
        assert "-shapline-shard-" in hanging, hanging  # in a shard, not in the flow's probe
    signalled = time.monotonic()
    run.send_signal(signal.SIGTERM)
    try:
        out, err = run.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        run.kill()
        raise
    took = time.monotonic() - signalled
    assert run.returncode == 143, err[-3000:]
    assert error_lines(err) == ["shapline: error: terminated (SIGTERM)"], err[-3000:]
    assert "Traceback" not in err
    assert out.strip().splitlines()[-1] == '{"status": "FAILED", "error": "terminated (SIGTERM)"}'
    [tracked] = all_runs(mlflow_store)
    assert tracked.info.status == "FAILED"
    assert MlflowClient(mlflow_store).get_run(tracked.info.run_id).data.tags["shapline.error"] == (
        "terminated (SIGTERM)"
    )
    if runner == "process":
        worker = int(hanging.split("-")[1])
        deadline = time.monotonic() + 30
        while psutil.pid_exists(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not psutil.pid_exists(worker), "the worker stuck in the model survived"
    assert took < 60, f"{took:.0f} s from SIGTERM to exit"
    print(f"{runner} runner: SIGTERM to exit {took:.1f} s")
