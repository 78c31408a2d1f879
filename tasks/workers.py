"""Worker processes for shards.runner process: started with the flow, warmed, replaced after a crash.

Each shard stays one Prefect task, run on a thread of the flow's process; the thread hands the shard's
SHAP compute to a plain process pool. Prefect's own process task runner starts a task engine (settings,
an API client, a run's states over HTTP) in the subprocess for every task, about half a second per
shard on two cores; here the workers only compute, and the flow's threads report to Prefect.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager

from flows.config import ModelConfig, ShardsConfig

log = logging.getLogger(__name__)

_POOLS: dict[str, ShardProcesses] = {}
_POOLS_LOCK = threading.Lock()


# What every worker imports; a fork server imports it once and forks the workers from there.
_PRELOAD = ["tasks.explain", "shap"]


def _context() -> multiprocessing.context.BaseContext:
    """forkserver where the platform has it, else spawn; never plain fork from the threaded flow process.

    The fork server is a fresh single-threaded process that imports shapline and shap once (~3 s on
    two cores); each worker is a fork of it, so N workers cost one import rather than N, and a pool
    replaced after a crash is back at once.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)  # no effect once the server runs, which is fine
        return context
    return multiprocessing.get_context("spawn")


def _warm(model: ModelConfig, threads: int | None) -> None:
    """Import what a shard needs and load the model once, while the flow loads and validates its data."""
    import shap  # noqa: F401 - the import is the point

    from tasks.models import load_predictor

    try:
        predictor = load_predictor(model)
        if threads is not None:
            predictor.limit_threads(threads)
    except Exception:  # the shard that needs the model reports the error, with its retries
        log.debug("warm-up could not load model %s", model.name, exc_info=True)


class ShardProcesses:
    """A process pool sized shards.workers (fork server or spawn), every worker started and warmed at once."""

    def __init__(self, workers: int, model: ModelConfig, threads: int | None) -> None:
        self.workers = workers
        self.model = model
        self.threads = threads
        self._lock = threading.Lock()
        self._executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=_context())
        # The pool starts a worker per submission while none is idle, so these start all of them now.
        for _ in range(self.workers):
            executor.submit(_warm, self.model, self.threads)
        return executor

    def run(self, job: object) -> object:
        """Run one shard in a worker; a crashed worker breaks the pool, which is replaced for the retry."""
        from tasks.explain import explain_shard

        executor = self._executor
        future: Future[object] = executor.submit(explain_shard, job)
        try:
            return future.result()
        except BrokenProcessPool:
            with self._lock:
                if self._executor is executor:
                    log.warning("a shard worker process died; starting a new pool for the retries")
                    executor.shutdown(wait=False, cancel_futures=True)
                    self._executor = self._start()
            raise

    def close(self) -> None:
        with self._lock:
            self._executor.shutdown(wait=True, cancel_futures=True)


@contextmanager
def shard_processes(shards: ShardsConfig, model: ModelConfig, threads: int | None) -> Iterator[str | None]:
    """For shards.runner process, a started pool's key for ShardJob.processes (None for other runners)."""
    if shards.runner != "process":
        yield None
        return
    key = uuid.uuid4().hex
    pool = ShardProcesses(shards.workers, model, threads)
    with _POOLS_LOCK:
        _POOLS[key] = pool
    try:
        yield key
    finally:
        with _POOLS_LOCK:
            del _POOLS[key]
        pool.close()


def run_in_processes(key: str, job: object) -> object:
    """Explain a shard in the pool registered under `key` by shard_processes."""
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
    if pool is None:
        raise RuntimeError(f"no shard worker pool {key}: shard_processes must wrap the shards")
    return pool.run(job)
