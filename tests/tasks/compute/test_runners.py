"""The process runner's pool: started beside the run, not in its way."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import cast

import pytest

from shapline.tasks.common.config import SklearnModel
from shapline.tasks.compute.runners import ProcessRunner
from shapline.tasks.compute.shards import ShardJob

MODEL = SklearnModel(name="m", kind="sklearn", path="no-such-model.joblib")


def test_the_pool_starts_while_the_run_goes_on(tmp_path: Path) -> None:
    """A process's first pool waits for the fork server to import shapline and shap (~2 s): the runner
    is back at once and the run loads and validates its data meanwhile. Here the fork server's import
    waits on a gate the script opens after constructing the runner (or after 30 s, so the old way,
    which waited for the import inside the constructor, fails rather than hangs)."""
    gate = tmp_path / "open"
    (tmp_path / "held_import.py").write_text(
        f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n    time.sleep(0.01)\n"
    )
    script = textwrap.dedent(
        f"""
        import os, threading
        from shapline.tasks.compute import runners
        from shapline.tasks.common.config import SklearnModel

        gate = {str(gate)!r}
        threading.Timer(30, lambda: open(gate, "w").close()).start()
        runners._PRELOAD = ["held_import"]  # what the fork server imports before it forks a worker
        runner = runners.ProcessRunner(1, SklearnModel(name="m", kind="sklearn", path="x"), 1, None)
        print("constructed before the import ended:", not os.path.exists(gate), flush=True)
        open(gate, "w").close()
        runner.wait_ready()  # what the flow calls before the explain phase's clock starts
        print("then running:", runner._started.is_set() and runner._running() is not None, flush=True)
        runner.close()
        print("closed", flush=True)
        os._exit(0)  # the 30 s timer is not waited for
        """
    )
    # The fork server is a fresh interpreter: it finds the held import through PYTHONPATH.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "constructed before the import ended: True",
        "then running: True",
        "closed",
    ]


def test_a_pool_that_cannot_start_fails_the_shard_that_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def cannot(self: ProcessRunner) -> None:
        raise OSError("Resource temporarily unavailable: fork")

    monkeypatch.setattr(ProcessRunner, "_start", cannot)
    runner = ProcessRunner(2, MODEL, 1, None)
    with pytest.raises(OSError, match="Resource temporarily unavailable: fork"):
        runner.compute(cast(ShardJob, None))  # fails before it would look at the job
    runner.close()  # nothing to shut down, and no error of its own


def _initializer_held_but_for_the_first(*args: object) -> None:
    """A pool initializer that is slow in every worker but the first to start, then says it is done. It reads
    the folder from the environment the runner hands its workers (args[3]): the fork server's own
    environment is the one of the moment an earlier test started it."""
    from shapline.tasks.compute import runners

    environment = cast(dict[str, str], args[3])
    folder = Path(environment["SHAPLINE_TEST_POOL_FOLDER"])
    try:
        (folder / "first").open("x").close()
    except FileExistsError:
        time.sleep(1.5)
    runners._start_worker(*args)  # type: ignore[arg-type]
    (folder / f"ready-{os.getpid()}").touch()


def test_the_pool_is_ready_once_every_worker_ran_its_initializer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The explain phase's clock starts at wait_ready: every worker must have imported and loaded the model
    by then. One warm-up call per worker is not enough on its own: the first worker ready used to answer
    them all while the others were still starting."""
    from shapline.tasks.compute import runners

    monkeypatch.setenv("SHAPLINE_TEST_POOL_FOLDER", str(tmp_path))
    monkeypatch.setattr(runners, "_start_worker", _initializer_held_but_for_the_first)
    runner = ProcessRunner(2, MODEL, 1, None)
    try:
        runner.wait_ready()
        assert len(list(tmp_path.glob("ready-*"))) == 2
    finally:
        runner.close()


def test_shard_threads_cap_the_native_threads_before_the_first_shard() -> None:
    """In a fresh process: the runner caps BLAS/OpenMP at the run's threads per worker while the flow loads and
    validates (threadpoolctl reads every library the process loaded, ~20 ms in a flow's process), for any
    algorithm, so the first shard does not; with no cap given it leaves them as they are."""
    script = textwrap.dedent(
        """
        from threadpoolctl import threadpool_info
        from shapline.tasks.common import cores
        from shapline.tasks.compute.runners import ThreadRunner

        runner = ThreadRunner(None)
        runner.prepare("tree")
        runner.wait_ready()
        print("none given:", cores._native_limit, flush=True)
        runner = ThreadRunner(None, threads=1)
        runner.prepare("tree")
        runner.wait_ready()
        print("one given:", cores._native_limit, {pool["num_threads"] for pool in threadpool_info()}, flush=True)
        runner.close()
        """
    )
    environment = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=environment
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["none given: None", "one given: 1 {1}"]


def test_shard_threads_load_the_engines_compiled_code_only_for_kernel_shap() -> None:
    """A fresh process (this one may have loaded it already): a tree run never starts LLVM (~50 MB); a
    kernel run has every common signature loaded once the runner is ready, before any shard, and has
    explained a small frame of every column kind (pandas' and pyarrow's first calls, not the first shard's)."""
    script = textwrap.dedent(
        """
        import sys
        from shapline.tasks.compute.runners import ThreadRunner

        runner = ThreadRunner(None)
        for algorithm in ("tree", "linear", "auto"):
            runner.prepare(algorithm)
        runner.wait_ready()
        print("after tree:", "llvmlite" in sys.modules, flush=True)
        from shapline.tasks.explainers import kernel_engine

        explained = []
        explain = kernel_engine.KernelEngine.explain

        def spied(self, rows, *args, **kwargs):
            explained.append(sorted({str(dtype) for dtype in rows.dtypes}))
            return explain(self, rows, *args, **kwargs)

        kernel_engine.KernelEngine.explain = spied
        runner.prepare("kernel")
        runner.prepare("kernel")  # once
        runner.wait_ready()
        from shapline.tasks.explainers import compiled
        print("after kernel:", len(compiled.fill_synthetic.signatures) >= 4, flush=True)
        print(*explained, sep="\\n", flush=True)
        runner.close()
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    kinds = "['Int64', 'bool', 'category', 'float64', 'int64', 'str']"
    assert done.stdout.splitlines() == ["after tree: False", "after kernel: True", kinds, kinds]
