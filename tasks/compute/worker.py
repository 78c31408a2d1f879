"""A process that only computes shards (a pool's fork server and its workers): what it loads, and what not.

Imported by the fork server before it forks any worker, so every worker starts with the shard code and
the kernel engine loaded once (its compiled code too: LLVM's ~0.2 s start and ~50 MB, paid once in the
fork server, never in a worker's first shard), and without plotting: shap imports its plots (and
matplotlib, time and memory in every process) whenever matplotlib can be imported, and has its own
fallback when it cannot. Nothing in such a process draws. MLflow and Great Expectations are never
imported by the shard code at all.
"""

from __future__ import annotations

import sys


def compute_only() -> None:
    """Say matplotlib is absent in this process (a None entry makes `import matplotlib` raise ImportError),
    unless something imported it already. Only for processes shapline owns: never a shared Dask worker."""
    sys.modules.setdefault("matplotlib", None)  # type: ignore[arg-type]


compute_only()

import shapline.tasks.compute.shards  # noqa: E402, F401 - what a worker runs
from shapline.tasks.explainers import kernel_engine  # noqa: E402 - what most shards compute with

# Once in a fork server: its workers are forks of a process whose compiled code is loaded and whose first
# explain's first-time costs are paid.
kernel_engine.warm_up()
