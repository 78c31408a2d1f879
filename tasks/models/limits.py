"""How many endpoint requests one run has in flight, held across every thread, process and machine sending them.

model.endpoint.max_concurrency is a promise to the endpoint, so the limit lives where every sender
can see it: a semaphore for threads of one process, an OS semaphore the process pool's workers
inherit, the Dask scheduler's semaphore (leases that expire if their worker dies) for a cluster.
The run's shard runner (tasks.runners) creates the limit and closes it with the run.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class RequestLimit(ABC):
    """At most `limit` requests in flight among everyone holding this object."""

    limit: int

    @abstractmethod
    def acquire(self) -> None:
        """Wait for a free slot and take it."""

    @abstractmethod
    def release(self) -> None:
        """Give a slot back."""

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the duration of one request."""
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def close(self) -> None:  # noqa: B027 - most limits hold nothing outside this process
        """Free what the limit holds outside this process."""


class _SemaphoreLimit(RequestLimit):
    """A limit held by a semaphore every sender can reach."""

    def __init__(self, limit: int, semaphore: Any) -> None:
        self.limit = limit
        self._semaphore = semaphore

    def acquire(self) -> None:
        self._semaphore.acquire()

    def release(self) -> None:
        self._semaphore.release()


class ThreadLimit(_SemaphoreLimit):
    """For senders that are threads of one process (shards.runner thread)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit, threading.BoundedSemaphore(limit))


class ProcessLimit(_SemaphoreLimit):
    """For a process pool's workers: an OS semaphore made from the pool's context, inherited when a worker starts.

    A worker killed while it holds a slot breaks the whole pool; the runner then makes a new pool and
    a new limit, so a dead worker's slot is never lost for the rest of the run.
    """

    def __init__(self, limit: int, context: Any) -> None:
        super().__init__(limit, context.BoundedSemaphore(limit))


class DaskLimit(RequestLimit):
    """For a Dask cluster's workers: the scheduler's semaphore, one lease per request.

    It travels with each shard by name (a distributed.Semaphore pickles as its name and size) and
    re-binds to the scheduler on the worker; a lease held by a worker that dies expires on the
    scheduler, so the slot comes back.
    """

    def __init__(self, limit: int, name: str) -> None:
        self.limit = limit
        self.name = name
        self._semaphore: Any = None

    def _bound(self) -> Any:
        if self._semaphore is None:
            from distributed import Semaphore

            self._semaphore = Semaphore(max_leases=self.limit, name=self.name)
        return self._semaphore

    def acquire(self) -> None:
        self._bound().acquire()

    def release(self) -> None:
        self._bound().release()

    def close(self) -> None:
        if self._semaphore is not None:
            self._semaphore.close()
            self._semaphore = None

    def __getstate__(self) -> dict[str, Any]:
        return {"limit": self.limit, "name": self.name, "_semaphore": None}
