"""How many cores this process may really use, and how many threads each shard worker gets of them."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from pathlib import Path


def usable_cores() -> int:
    """The CPUs this process may run on: its affinity (taskset, a pinned worker) and the CPU quota of its
    cgroup and every parent (a container limited to `cpu: 1` on a 64-core node is one core), not the
    machine's count. joblib's count reads the quota only where a container sees its cgroup as the root;
    this reads the process's own cgroup, v1 or v2, as well."""
    from joblib import cpu_count

    quota = cgroup_cpu_quota()
    counted = int(cpu_count())
    if quota is not None:
        counted = min(counted, max(1, math.ceil(quota)))
    return max(1, counted)


def cgroup_cpu_quota(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs this process's cgroups allow (quota / period, the smallest on the way to the root), or None."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # cgroup v2: cpu.max is "<quota> <period>" or "max <period>"
            limits += _walk(Path(root), path, _v2_limit)
        elif "cpu" in controllers.split(","):
            mount = next(
                (Path(root, m) for m in (controllers, "cpu", "cpu,cpuacct") if Path(root, m).is_dir()), None
            )
            if mount is not None:
                limits += _walk(mount, path, _v1_limit)
    return min(limits) if limits else None


def _walk(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    found = []
    folder = mount / path.lstrip("/")
    while True:
        limit = read(folder)
        if limit is not None:
            found.append(limit)
        if folder == mount or mount not in folder.parents:
            return found
        folder = folder.parent


def _v2_limit(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_limit(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def threads_per_worker(runner: str, workers: int) -> int | None:
    """Cores each shard worker may use, so workers x model threads never oversubscribe the cores; at most
    OMP_NUM_THREADS when the user set it (their cap on native threads, which shapline keeps)."""
    if runner == "dask":
        return None  # Dask workers are sized by their own deployment.
    threads = max(1, usable_cores() // max(1, workers))
    chosen = native_thread_cap()
    return threads if chosen is None else min(threads, chosen)


def native_thread_cap() -> int | None:
    """OMP_NUM_THREADS as a number of threads, when it is set to one (else None)."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


_NATIVE_LIMIT_LOCK = threading.Lock()
_native_limit: int | None = None


def limit_native_threads(threads: int) -> None:
    """Cap BLAS/OpenMP threads in this process, once per value: finding the libraries is not free.

    Set, never restored: a `with threadpool_limits` per shard would restore the process-wide limit
    when one shard ends while the worker's other shards still run. A run's shards share one limit.
    """
    global _native_limit
    from threadpoolctl import threadpool_limits

    with _NATIVE_LIMIT_LOCK:
        if _native_limit != threads:
            threadpool_limits(limits=threads)
            _native_limit = threads
