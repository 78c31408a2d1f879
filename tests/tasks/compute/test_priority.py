"""Lowering a process's CPU priority reaches every thread it has started, and the processes it started."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from shapline.tasks.compute.priority import lower_priority

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads' niceness: Linux")

# A process that starts three threads and a child process, says so, and waits until it is killed.
BUSY_FAMILY = """
import subprocess, sys, threading, time
threads = [threading.Thread(target=time.sleep, args=(60,), daemon=True) for _ in range(3)]
for thread in threads:
    thread.start()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def family() -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen([sys.executable, "-c", BUSY_FAMILY], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        yield process
    finally:
        for child in _children(process.pid):
            os.kill(child, 9)
        process.kill()
        process.wait()


def _children(pid: int) -> list[int]:
    found = []
    for thread in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{thread}/children") as children:
            found += [int(child) for child in children.read().split()]
    return found


def niceness(pid: int) -> dict[int, int]:
    """The kernel's own account of each thread's niceness (field 19 of /proc/<pid>/task/<tid>/stat), for
    `pid` and its child processes, by thread id: a reference the code under test does not share."""
    if not os.path.isdir(f"/proc/{pid}/task"):
        return {}
    found = {}
    for thread in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{thread}/stat") as stat:
            found[int(thread)] = int(stat.read().rsplit(")", 1)[1].split()[16])
    for child in _children(pid):
        found |= niceness(child)
    return found


def test_every_thread_of_the_process_and_of_its_child_gets_the_niceness(
    family: subprocess.Popen[str],
) -> None:
    before = niceness(family.pid)
    assert len(before) >= 5 and set(before.values()) == {os.getpriority(os.PRIO_PROCESS, 0)}
    assert len(_children(family.pid)) == 1
    assert lower_priority(family.pid, 7) == len(before)
    after = niceness(family.pid)
    assert after.keys() == before.keys() and set(after.values()) == {7}
    # A thread already nicer keeps its niceness: a lower value is not a higher priority.
    assert lower_priority(family.pid, 3) == 0
    assert set(niceness(family.pid).values()) == {7}


def test_a_process_that_ended_is_nothing_to_lower() -> None:
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    assert lower_priority(ended.pid, 7) == 0
    assert niceness(ended.pid) == {}
