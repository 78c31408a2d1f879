"""How many cores this process may really use, and how many threads each shard worker gets of them."""

from __future__ import annotations


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
