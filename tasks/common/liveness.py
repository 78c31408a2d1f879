"""Whether the process behind a claim or a RUNNING run is still alive, so a killed run's leftovers can go."""

from __future__ import annotations

import os
import socket


def this_host() -> str:
    """The host name claims and runs are tagged with."""
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this host (a reused pid counts as alive: the safe side)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
