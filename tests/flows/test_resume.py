"""Resume after a crash: a killed run's finished shards are reused, and the values equal an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from shapline.flows.cli import main
from tests.helpers import assert_same_values

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]


SHARDS = 32


def test_rerun_after_a_killed_process_reuses_finished_shards(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from prefect.settings import PREFECT_API_URL

    config = write_config(
        model={"name": "resume", "kind": "sklearn", "path": str(mlp_model)},
        # 32 shards of 2 rows: the kill must land while some are finished and others not, and a shard of
        # this small model takes only milliseconds, so the window is many shards wide (and polled often).
        data={"source": str(cancer_data), "target": "malignant", "explain_rows": 2 * SHARDS, "seed": 3},
        background={"size": 10},
        explainer={"algorithm": "kernel", "nsamples": 400, "seed": 5},
        shards={"size": 2, "workers": 1},
        output={"plots": []},
    )
    cache = tmp_path / "shard-cache"
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "SHAPLINE_CACHE_DIR": str(cache)}
    crashing = subprocess.Popen(
        [sys.executable, "-m", "shapline", "run", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while len(list(cache.glob("*/shard-*.parquet"))) < 2:
        assert crashing.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no shard finished in time"
        time.sleep(0.02)
    os.killpg(crashing.pid, signal.SIGKILL)
    crashing.wait()
    finished_before = len(list(cache.glob("*/shard-*.parquet")))
    assert 2 <= finished_before < SHARDS

    assert main(["run", str(config), "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["shards_reused"] == finished_before
    assert resumed["shards_computed"] == SHARDS - finished_before
    metrics = MlflowClient(mlflow_store).get_run(resumed["mlflow_run_id"]).data.metrics
    assert (
        metrics["shards_reused"] == finished_before and metrics["shards_computed"] == SHARDS - finished_before
    )
    assert not list(cache.glob("*/shard-*.parquet")), "finished shards are removed after a successful run"
    # The killed run could not end itself; the next run in the experiment marked it KILLED, with why.
    experiment = MlflowClient(mlflow_store).get_run(resumed["mlflow_run_id"]).info.experiment_id
    (killed,) = MlflowClient(mlflow_store).search_runs([experiment], "attributes.status = 'KILLED'")
    assert f"pid {crashing.pid}" in killed.data.tags["shapline.error"]

    assert main(["run", str(config), "--json", "--set", f"shards.cache_dir={tmp_path / 'fresh'}"]) == 0
    fresh = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fresh["shards_reused"] == 0
    assert_same_values(mlflow_store, resumed, fresh, tmp_path)


def test_a_run_keeps_the_shards_another_live_run_is_using(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A scheduled run and a manual one of the same config share a shard store; the first to finish keeps it."""
    import socket

    cache = tmp_path / "cache"
    config = write_config(
        model={"name": "overlap", "kind": "sklearn", "path": str(mlp_model)},
        data={"source": str(cancer_data), "target": "malignant", "explain_rows": 8, "seed": 3},
        background={"size": 10},
        explainer={"algorithm": "kernel", "nsamples": 100, "seed": 5},
        shards={"size": 4, "workers": 1, "cache_dir": str(cache)},
        output={"plots": []},
    )

    def run(*extra: str) -> dict:
        assert main(["run", str(config), "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    run("--set", "shards.keep=true")
    (store,) = [path for path in cache.iterdir() if path.is_dir()]
    # Another run of this config, alive on this host, is using the store.
    other = store / ".claims" / "other-run"
    other.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    assert run()["shards_reused"] == 2
    assert len(list(store.glob("shard-*.parquet"))) == 2, "the other run's shards must survive"
    other.unlink()  # the other run finished
    assert run()["shards_reused"] == 2
    assert not list(store.glob("shard-*.parquet")), "the last run using the store deletes its shards"


def test_a_corrupted_shard_in_the_store_is_computed_again_never_trusted(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.helpers import assert_same_values, flow_run_logs, run_cli

    config = write_config(
        model={"name": "corrupted", "kind": "sklearn", "path": str(mlp_model)},
        data={"source": str(cancer_data), "target": "malignant", "explain_rows": 8, "seed": 3},
        background={"size": 8},
        explainer={"algorithm": "kernel", "nsamples": 60, "seed": 5},
        shards={"size": 2, "workers": 2, "keep": True},
        output={"plots": []},
    )
    code, first, err = run_cli(["run", str(config), "--json"], capsys)
    assert code == 0, err
    shards = sorted((tmp_path / "shard-cache").glob("*/shard-*.parquet"))
    assert len(shards) == 4
    shards[0].write_bytes(b"")  # a disk that filled up
    shards[2].write_bytes(shards[2].read_bytes()[:200])  # a copy cut short
    code, second, err = run_cli(["run", str(config), "--json"], capsys)
    assert code == 0, err
    assert second["shards_reused"] == 2 and second["shards_computed"] == 2
    said = [
        line
        for line in flow_run_logs(mlflow_store, second)
        if "cannot be read" in line and "computing it again" in line
    ]
    assert len(said) == 2
    assert_same_values(mlflow_store, first, second, tmp_path, atol=0)


def test_shards_reused_from_the_store_add_no_model_time(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """model_s and model_cpu_s are this run's seconds in the model: a shard another run computed adds none."""
    config = write_config(
        model={"name": "reused-time", "kind": "sklearn", "path": str(mlp_model)},
        data={"source": str(cancer_data), "target": "malignant", "explain_rows": 8, "seed": 3},
        background={"size": 10},
        explainer={"algorithm": "kernel", "nsamples": 100, "seed": 5},
        shards={"size": 4, "workers": 1, "cache_dir": str(tmp_path / "cache")},
        output={"plots": []},
    )

    def run(*extra: str) -> dict:
        assert main(["run", str(config), "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    computed = run("--set", "shards.keep=true")
    assert computed["shards_reused"] == 0 and computed["model_s"] > 0 and computed["model_cpu_s"] > 0
    reused = run()
    assert reused["shards_reused"] == 2 and reused["shards_computed"] == 0
    assert reused["model_s"] == 0 and reused["model_cpu_s"] == 0
