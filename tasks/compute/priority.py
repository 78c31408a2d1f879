"""A process's CPU priority, every thread of it: how a run keeps its temporary Prefect server off the workers' cores."""

from __future__ import annotations

import os
from pathlib import Path


def lower_priority(pid: int, niceness: int) -> int:
    """Give every thread of process `pid`, and of the processes it started, a niceness of at least `niceness`.

    Linux keeps a niceness per thread: setpriority on the pid alone would leave the threads the process has
    already started at their old priority (threads and processes started later inherit the new one). A
    thread already nicer is left alone, as is one that ended or is not this user's. Returns how many threads
    changed; 0 where the system has no setpriority (Windows).
    """
    if not hasattr(os, "setpriority"):
        return 0
    changed = 0
    for thread in _threads(pid):
        try:
            if os.getpriority(os.PRIO_PROCESS, thread) < niceness:
                os.setpriority(os.PRIO_PROCESS, thread, niceness)
                changed += 1
        except (ProcessLookupError, PermissionError):
            continue
    return changed


def _threads(pid: int) -> list[int]:
    """Thread ids of `pid` and its descendants (Linux's /proc); just `pid` where there is no /proc."""
    if not Path("/proc/self/task").is_dir():
        return [pid]
    tasks = Path(f"/proc/{pid}/task")
    found: list[int] = []
    try:
        threads = [int(entry.name) for entry in tasks.iterdir()]
    except OSError:  # the process ended
        return found
    for thread in threads:
        found.append(thread)
        try:
            children = (tasks / str(thread) / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            found += _threads(int(child))
    return found
