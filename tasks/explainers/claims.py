"""Which of a shard's rows a worker explains: every row, or the rows it claims before another worker does.

A worker whose shards are done may help a Kernel SHAP shard that is still running (shards.runner thread or
process, see compute/runners.py). The shard's owner and its helpers then take the shard's rows, a model
call's worth at a time, from one counter: each row is explained once, by whichever worker claimed it, and
the workers run out of rows at about the same time, so none idles while another finishes a shard alone.
Values do not depend on which worker explained a row: every row's coalitions come from its own seed.
"""

from __future__ import annotations

import threading
from typing import Protocol


def share_of(left: int, count: int, joined: bool) -> int:
    """How many of the `count` rows asked for a worker gets of `left` rows: once a helper has joined, at most
    half of them (one at least), so a call that would merge many rows leaves the other worker some."""
    return max(0, min(count, -(-left // 2) if joined else left))


class RowClaims(Protocol):
    """The rows of one shard, handed out in order to whoever asks first."""

    def take(self, count: int) -> range:
        """Claim the next `count` rows still unclaimed (fewer at the end, none once every row is taken)."""
        ...

    def left(self) -> int:
        """Rows no worker has claimed yet."""
        ...

    def join(self) -> None:
        """A helper is about to claim rows too: from now on a claim gets at most half the rows left."""
        ...


class AllRows:
    """Every row for the one worker that asks: a shard explained alone."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self._next = 0

    def take(self, count: int) -> range:
        start = self._next
        self._next = min(start + max(count, 0), self.rows)
        return range(start, self._next)

    def left(self) -> int:
        return self.rows - self._next

    def join(self) -> None:
        raise ValueError("a shard explained alone has no helpers")


class SharedRows:
    """A shard's rows shared by threads of one process (shards.runner thread)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self._next = 0
        self._joined = False
        self._lock = threading.Lock()

    def take(self, count: int) -> range:
        with self._lock:
            start = self._next
            self._next = start + share_of(self.rows - start, count, self._joined)
            return range(start, self._next)

    def join(self) -> None:
        with self._lock:
            self._joined = True

    def left(self) -> int:
        with self._lock:
            return self.rows - self._next
