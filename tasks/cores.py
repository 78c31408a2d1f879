"""How many cores this process may really use, and how many threads each shard worker gets of them."""

from __future__ import annotations

import threading


def usable_cores() -> int:
    """The CPUs this process may run on: its affinity (taskset, a pinned worker) and its cgroup CPU quota
    (a container limited to `cpu: 1` on a 64-core node is one core), not the machine's count."""
    from joblib import cpu_count

    return max(1, int(cpu_count()))


def threads_per_worker(runner: str, workers: int) -> int | None:
    """Cores each shard worker may use, so workers x model threads never oversubscribe the cores."""
    if runner == "dask":
        return None  # Dask workers are sized by their own deployment.
    return max(1, usable_cores() // max(1, workers))


_NATIVE_LIMIT_LOCK = threading.Lock()
_native_limit: int | None = None


def limit_native_threads(threads: int) -> None:
    """Cap BLAS/OpenMP threads in this process, once per value: finding the libraries costs ~50 ms.

    Set, never restored: a `with threadpool_limits` per shard would restore the process-wide limit
    when one shard ends while the worker's other shards still run. A run's shards share one limit.
    """
    global _native_limit
    from threadpoolctl import threadpool_limits

    with _NATIVE_LIMIT_LOCK:
        if _native_limit != threads:
            threadpool_limits(limits=threads)
            _native_limit = threads
