"""Where shards run, under real processes: a Dask cluster that shares nothing with the flow, workers that
never start Prefect servers, an endpoint request limit that holds across processes, endpoint faults retried."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import shapline.tasks.models.sagemaker.endpoint as endpoint_module
from shapline.testing.endpoint import EndpointServer
from tests.helpers import assert_same_values, flow_run_of, free_port, run_cli, shard_task_runs

pytestmark = [pytest.mark.usefixtures("prefect_server", "aws_env"), pytest.mark.slow]
BIN = Path(sys.executable).parent


def kernel_sections(cancer_data: Path, **shards: Any) -> dict[str, Any]:
    return {
        "data": {"source": str(cancer_data), "target": "malignant", "explain_rows": 6, "seed": 4},
        "background": {"size": 10},
        "explainer": {"algorithm": "kernel", "nsamples": 120, "seed": 3},
        "shards": {"size": 2, "workers": 2, **shards},
        "output": {"plots": []},
    }


def can_unshare() -> bool:
    """A private mount namespace (root, or user namespaces allowed) for a worker that cannot see /tmp."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs none /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


def prefect_servers() -> set[int]:
    """Pids of every process that is a Prefect API server (a temporary one runs `prefect server start`)."""
    found = set()
    for process in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if "prefect" in line and "server" in line and "start" in line:
            found.add(process.info["pid"])
    return found


@pytest.fixture(scope="module")
def remote_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A scheduler and a two-process `dask worker` started apart from the flow, the worker in its own mount
    namespace where pytest's temporary folders (the tests' data, the flow's scratch folders, which the
    tests put there, and its shard store) are an empty tmpfs. Only the model is shared, from a folder
    outside them, as the README says a remote worker needs."""
    logs = tmp_path_factory.mktemp("dask-logs")
    hidden = tmp_path_factory.getbasetemp().parent
    shared = Path(tempfile.mkdtemp(prefix="shapline-shared-model-", dir="/var/tmp"))
    port = free_port()
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)
    scheduler_log = open(logs / "scheduler.log", "w")  # noqa: SIM115
    worker_log = open(logs / "worker.log", "w")  # noqa: SIM115
    scheduler = subprocess.Popen(
        [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        env=env,
        stdout=scheduler_log,
        stderr=subprocess.STDOUT,
    )
    address = f"tcp://127.0.0.1:{port}"
    worker_command = [
        str(BIN / "dask"),
        "worker",
        address,
        "--nworkers",
        "2",
        "--nthreads",
        "1",
        "--no-dashboard",
    ]
    isolated = can_unshare()
    if isolated:
        worker_command = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'mount -t tmpfs shapline-worker-tmp "{hidden}" && exec "$@"',
            "sh",
            *worker_command,
        ]
    worker = subprocess.Popen(worker_command, env=env, stdout=worker_log, stderr=subprocess.STDOUT)
    try:
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        yield {"address": address, "shared": shared, "isolated": isolated, "worker": worker, "logs": logs}
    finally:
        for process in (worker, scheduler):
            process.terminate()
        for process in (worker, scheduler):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        scheduler_log.close()
        worker_log.close()
        shutil.rmtree(shared, ignore_errors=True)


def test_a_remote_dask_worker_that_shares_only_the_model_explains_every_shard(
    monkeypatch: pytest.MonkeyPatch,
    remote_cluster: dict[str, Any],
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from distributed import Client

    model = remote_cluster["shared"] / "cancer-mlp.joblib"
    shutil.copy(mlp_model, model)
    # The flow's scratch folders go under this test's folder, which the worker cannot see.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    if remote_cluster["isolated"]:
        with Client(remote_cluster["address"]) as client:
            seen = client.run(
                lambda: [os.path.exists(p) for p in (str(tmp_path), str(cancer_data), str(model))]
            )
        assert all(found == [False, False, True] for found in seen.values()), seen
    before = prefect_servers()
    thread = write_config(
        model={"name": "cancer-thread", "kind": "sklearn", "path": str(model)}, **kernel_sections(cancer_data)
    )
    remote = write_config(
        model={"name": "cancer-remote-dask", "kind": "sklearn", "path": str(model)},
        **kernel_sections(cancer_data, runner="dask", address=remote_cluster["address"]),
    )
    code, reference, err = run_cli(["run", str(thread), "--json"], capsys)
    assert code == 0, err
    code, summary, err = run_cli(["run", str(remote), "--json"], capsys)
    assert code == 0, err + (remote_cluster["logs"] / "worker.log").read_text()[-3000:]
    assert summary["shards_computed"] == 3
    assert_same_values(mlflow_store, reference, summary, tmp_path)
    # The shard tasks reported to the flow's own Prefect API, and no worker started a server of its own.
    assert prefect_servers() <= before
    assert "Starting temporary server" not in (remote_cluster["logs"] / "worker.log").read_text()
    names = [r.name for r in shard_task_runs(flow_run_of(mlflow_store, summary), 3)]
    assert names == ["explain-shard-0", "explain-shard-1", "explain-shard-2"]


def test_a_local_dask_cluster_leaves_nothing_running(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def ours() -> set[int]:
        # multiprocessing's resource tracker and fork server are one per flow process, not per run.
        return {
            p.pid
            for p in psutil.Process().children(recursive=True)
            if not any(helper in " ".join(p.cmdline()) for helper in ("resource_tracker", "forkserver"))
        }

    before_servers = prefect_servers()
    before_children = ours()
    config = write_config(
        model={"name": "cancer-local-dask", "kind": "sklearn", "path": str(mlp_model)},
        **kernel_sections(cancer_data, runner="dask"),
    )
    code, summary, err = run_cli(["run", str(config), "--json"], capsys)
    assert code == 0, err
    assert len(shard_task_runs(flow_run_of(summary["tracking_uri"], summary), 3)) == 3
    assert prefect_servers() <= before_servers
    deadline = time.monotonic() + 30
    while (left := ours() - before_children) and (time.monotonic() < deadline):
        time.sleep(0.5)
    assert not left, [psutil.Process(pid).cmdline() for pid in left if psutil.pid_exists(pid)]


@pytest.mark.parametrize("runner", ["thread", "process", "dask"])
def test_max_concurrency_holds_across_every_worker_of_a_run(
    runner: str,
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The endpoint counts the requests it is answering at once: never more than max_concurrency."""
    with EndpointServer(str(mlp_model), "counted", latency_s=0.05) as server:
        config = write_config(
            model={
                "name": f"cancer-limit-{runner}",
                "kind": "sagemaker",
                "endpoint": {
                    "name": "counted",
                    "endpoint_url": server.url,
                    "max_concurrency": 1,
                    "max_rows_per_request": 400,
                },
            },
            **kernel_sections(cancer_data, runner=runner),
        )
        code, _, err = run_cli(["run", str(config), "--json"], capsys)
        stats = server.stats
    assert code == 0, err
    assert stats["requests"] >= 12 and stats["max_in_flight"] == 1, stats


def endpoint_config(write_config: Callable[..., Path], cancer_data: Path, url: str, **endpoint: Any) -> Path:
    return write_config(
        model={
            "name": "cancer-faults",
            "kind": "sagemaker",
            "endpoint": {"name": "faulty", "endpoint_url": url, **endpoint},
        },
        **{**kernel_sections(cancer_data), "shards": {"size": 6, "workers": 1}},
    )


def test_a_dropped_endpoint_connection_is_retried_by_the_task_after_the_predictor_gives_up(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:

    # Request 1 is the flow's probe. The shard's first request is reset every time it is tried, by
    # botocore (its first try and max_attempts retries) within each of the predictor's attempts: the
    # predictor gives up, the task retries later, and its requests get through.
    attempts = (endpoint_module.BOTOCORE_MAX_ATTEMPTS + 1) * endpoint_module.RETRY_ATTEMPTS
    with EndpointServer(str(mlp_model), "faulty", reset_requests=(2, attempts)) as server:
        code, summary, err = run_cli(
            ["run", str(endpoint_config(write_config, cancer_data, server.url)), "--json"], capsys
        )
        stats = server.stats
    assert code == 0, err
    assert stats["reset"] == attempts
    assert [r.run_count for r in shard_task_runs(flow_run_of(mlflow_store, summary), 1)] == [2]
    local = write_config(
        model={"name": "cancer-faults-local", "kind": "sklearn", "path": str(mlp_model)},
        **{**kernel_sections(cancer_data), "shards": {"size": 6, "workers": 1}},
    )
    code, reference, err = run_cli(["run", str(local), "--json"], capsys)
    assert_same_values(mlflow_store, summary, reference, tmp_path, atol=1e-6)


def test_a_bad_request_is_not_retried(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    mlflow_store: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.helpers import all_runs

    # The probe's two rows fit; a shard's requests do not: the endpoint answers 413, which no retry cures.
    with EndpointServer(str(mlp_model), "faulty", max_payload_bytes=2_000) as server:
        config = endpoint_config(write_config, cancer_data, server.url, max_payload_mb=0.5)
        code, summary, err = run_cli(["run", str(config), "--json"], capsys)
        too_large = server.stats["too_large"]
    assert code == 1 and "HTTP 413" in summary["error"] and too_large == 1
    [run] = all_runs(mlflow_store)
    assert run.info.status == "FAILED"
    assert [r.run_count for r in shard_task_runs(run.data.tags["prefect.flow_run_id"], 1)] == [1]


def test_the_retry_rule_retries_faults_and_never_bad_inputs() -> None:
    from shapline.flows.explain import _worth_retrying
    from shapline.tasks.common.errors import ModelError, TransientModelError
    from shapline.tasks.compute.runners import ShardWorkerLost

    class Failed:
        def __init__(self, error: BaseException) -> None:
            self.error = error

        def result(self) -> None:
            raise self.error

    assert not _worth_retrying(None, None, Failed(ModelError("endpoint x: ValidationError (HTTP 413)")))
    assert not _worth_retrying(None, None, Failed(ValueError("could not convert string to float")))
    assert _worth_retrying(None, None, Failed(TransientModelError("endpoint x: ConnectionError")))
    assert _worth_retrying(None, None, Failed(ShardWorkerLost("a worker died")))
    assert _worth_retrying(None, None, Failed(ConnectionResetError("reset")))


@pytest.mark.parametrize(
    ("moment", "pause_on", "kill_at"),
    [
        ("warming up", {"loading"}, "loading"),
        # The flow's probe pauses, so the workers have loaded the model and sit idle when one is killed.
        ("idle", {"probing"}, "loaded"),
        ("mid-shard", {"predicting"}, "predicting"),
    ],
)
def test_a_pool_worker_killed_at_any_moment_costs_no_shard(
    moment: str,
    pause_on: set[str],
    kill_at: str,
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`kill -9` of the pool's only worker, once: a new pool, the shards retried, the values unchanged."""
    import signal

    import joblib

    from tests.helpers import Watched

    markers = tmp_path / "markers"
    markers.mkdir()
    watched = tmp_path / "watched.joblib"
    joblib.dump(Watched(joblib.load(mlp_model), str(markers), pause_on), watched)
    common = {
        "data": {"source": str(cancer_data), "target": "malignant", "explain_rows": 4, "seed": 2},
        "background": {"size": 8},
        "explainer": {"algorithm": "kernel", "nsamples": 40, "seed": 7},
        "output": {"plots": []},
    }
    crashing = write_config(
        model={"name": "cancer-killed", "kind": "sklearn", "path": str(watched)},
        shards={"size": 1, "runner": "process", "workers": 1},
        **common,
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.Popen(
        [str(BIN / "shapline"), "run", str(crashing), "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and run.poll() is None and time.monotonic() < deadline:
        found = sorted(markers.glob(f"{kill_at}-*"))
        flow_waits = moment != "idle" or any(markers.glob("probing-*"))
        if found and flow_waits:
            killed = int(found[0].name.rsplit("-", 1)[1])
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    out, err = run.communicate(timeout=300)
    assert killed is not None, f"never saw {kill_at}: {err[-2000:]}"
    assert run.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "FINISHED" and summary["shards_computed"] == 4
    plain = write_config(
        model={"name": "cancer-plain", "kind": "sklearn", "path": str(mlp_model)},
        shards={"size": 4, "workers": 1},
        **common,
    )
    code, reference, err = run_cli(["run", str(plain), "--json"], capsys)
    assert code == 0, err
    assert_same_values(mlflow_store, summary, reference, tmp_path)


@pytest.mark.parametrize("runner", ["process", "thread"])
def test_two_workers_share_the_rows_of_a_runs_one_shard_with_the_values_of_one_worker(
    runner: str,
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    mlflow_store: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """40 rows at the default shards.size are one shard: the second worker helps it rather than idling, the
    log says so, and the values are the one-worker run's bit for bit (a row a call either way)."""
    sections = kernel_sections(cancer_data, runner=runner)
    sections["data"]["explain_rows"] = 40
    sections["explainer"]["batch_rows"] = 1
    del sections["shards"]["size"]
    config = write_config(
        model={"name": f"cancer-helped-{runner}", "kind": "sklearn", "path": str(mlp_model)}, **sections
    )
    code, shared, err = run_cli(["run", str(config), "--json"], capsys)
    assert code == 0, err
    assert shared["shards"] == 1
    done = [m for m in caplog.messages if m.startswith("shards done 1/1")]
    assert len(done) == 1 and "of them by workers that had finished their own" in done[0], done
    caplog.clear()
    monkeypatch.setenv("SHAPLINE_CACHE_DIR", str(tmp_path / "alone-cache"))  # not the shard just written
    code, alone, err = run_cli(["run", str(config), "--json", "--set", "shards.workers=1"], capsys)
    assert code == 0, err
    assert not any("by workers that had finished their own" in m for m in caplog.messages)
    assert_same_values(mlflow_store, shared, alone, tmp_path, atol=0)
