"""Where a run's shards are computed: threads of the flow's process, a pool of processes, or a Dask cluster.

Every shard stays one Prefect task on a thread of the flow's process, which reports to the flow's
own Prefect API; the task hands the shard's SHAP compute to the run's ShardRunner and writes the
values that come back into the shard store. So workers never talk to Prefect (no Dask worker starts
a Prefect server of its own) and never need the flow's files: a job carries its rows and background.

One runner per run, created and closed by the flow: it owns the run's workers and the limit on
endpoint requests in flight that all of them share.

A shard task that has written its values starts the run's next shard itself (`start_next`), on the worker
it freed, before Prefect ends that task and starts the next one: a worker waits for the store write, not
for Prefect's bookkeeping between two tasks (measured in docs/performance.md).

A worker with no shard left to start helps a Kernel SHAP shard still running (threads and a pool): the
shard's rows are claimed a model call's worth at a time by its owner and its helpers (explainers/claims.py),
and the shard's task puts their parts together before it writes the shard. So the last shards of a run end
on every worker at about the same time, and a run of fewer shards than workers keeps every worker busy.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import logging
import multiprocessing
import os
import queue
import threading
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from shapline.tasks.common.config import ModelConfig, SageMakerModel, ShardsConfig
from shapline.tasks.common.cores import limit_native_threads
from shapline.tasks.common.environment import environment
from shapline.tasks.common.errors import ShaplineError
from shapline.tasks.compute.shards import ShardJob, explain_shard, shard_label
from shapline.tasks.explainers.claims import AllRows, RowClaims, SharedRows, share_of
from shapline.tasks.explainers.explain import ShardValues
from shapline.tasks.models.limits import DaskLimit, ProcessLimit, RequestLimit, ThreadLimit

log = logging.getLogger(__name__)

# The name prefix of the thread runner's shard threads: one stuck in a model call is told apart in a
# thread dump (py-spy, faulthandler) and by the tests.
SHARD_THREAD = "shapline-shard"
_DEFAULT_TIMEOUT_S: float = ShardsConfig.model_fields["timeout_s"].default


class ShardWorkerLost(Exception):
    """The process or machine computing a shard went away (killed, crashed, disconnected): worth a retry."""

    transient = True


class ShardTimeout(ShaplineError):
    """A shard gave no result within shards.timeout_s (a model that never returns): a fault, so retried."""

    transient = True


class ShardAbandoned(ShaplineError):
    """The run stopped (SIGTERM, Ctrl-C) while the shard waited for its model: nothing to retry."""


class _Pending(Protocol):
    """A shard's result to come: a concurrent.futures or a Dask future."""

    def done(self) -> bool: ...

    def add_done_callback(self, fn: Callable[[Any], object], /) -> None: ...


class Upcoming(Protocol):
    """A shard the run will explain, before its rows are read (a StagedJob)."""

    @property
    def index(self) -> int: ...

    def job(self) -> ShardJob: ...


class _Ahead:
    """A shard `start_next` took: its job and what its start returned, once it has (None: not started)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.job: ShardJob | None = None
        self.handle: Any = None


class _Shared:
    """A running Kernel SHAP shard whose rows workers share: its job (with the claims) and its helpers."""

    def __init__(self, job: ShardJob, claims: RowClaims) -> None:
        self.job = job  # carries `claims`
        self.claims = claims
        self.helpers: list[Any] = []  # what _start_ahead returned for each; fixed once closed
        self.closed = False  # its task is putting the parts together: no helper may join now
        self.lock = threading.Lock()

    def left(self) -> int:
        return self.claims.left()


# A shard's rows are shared only if it has this many: a row is never split between workers.
_SHARE_MIN_ROWS = 2


class ShardRunner(ABC):
    """Computes shards for one run; a context manager that frees its workers when the run ends.

    A shard waits at most `timeout_s` for its values (ShardTimeout, which the shard task retries), and
    not at all once the runner is stopped (ShardAbandoned). Given the run's shards in the order their tasks
    start (`expect`), a task that finished starts the next one (`start_next`) and that one's task waits
    for it (`run`); the timeout of a shard started so counts from its task's wait.
    """

    # Whether a shard can be started ahead of its task (`_start_ahead`): threads and a pool's processes.
    starts_ahead = False

    def __init__(self, timeout_s: float = _DEFAULT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._stopping = False
        self._waiting: set[threading.Event] = set()
        self._waiting_lock = threading.Lock()
        self._upcoming: deque[Upcoming] = deque()
        self._claimed: set[int] = set()  # shards whose task asked first: never started ahead
        self._ahead: dict[int, _Ahead] = {}
        self._ahead_lock = threading.Lock()
        self._flow_context = contextvars.copy_context()
        self._shared: dict[int, _Shared] = {}  # by shard index: the shards whose rows workers share

    @abstractmethod
    def compute(self, job: ShardJob) -> ShardValues:
        """Explain one shard somewhere and return its values to this process."""

    def _start_ahead(self, job: ShardJob) -> Any:
        """Start `job` on a worker without waiting for it; what `_finish` waits on, or None where this
        runner starts no shard ahead (its task then computes it)."""
        return None

    def _finish(self, handle: Any, job: ShardJob) -> ShardValues:
        """The values of a shard `_start_ahead` started, waited for as `compute` waits."""
        raise NotImplementedError

    def _claims(self, rows: int) -> RowClaims | None:
        """A counter of `rows` rows that this runner's workers can share, or None where they cannot."""
        return None

    def _release(self, claims: RowClaims) -> None:  # noqa: B027 - most claims need no freeing
        """The try of `claims` is over (put together, or failed): its counter may serve another shard, and a
        worker still claiming from it gets no more rows."""

    def expect(self, upcoming: Sequence[Upcoming], start: int = 0) -> None:
        """The run's shards still to explain, in the order their tasks start (the flow's map order), the first
        `start` of them started now (one per worker: their tasks find them running). Called on the flow's
        thread: a shard started ahead runs in the flow's context, not a task's."""
        with self._ahead_lock:
            self._upcoming = deque(upcoming)
            self._claimed.clear()
            self._ahead.clear()
            self._shared.clear()
            self._flow_context = contextvars.copy_context()
        for _ in range(start):  # fewer shards than workers: the others help them from the start
            self.start_next()

    def start_next(self) -> None:
        """A shard task's values are in the store: start the next expected shard now, on the worker this one
        freed. Its task, which Prefect starts once this one has ended, finds it running (`run`). Never raises:
        a shard that cannot start ahead is started by its own task."""
        if not self.starts_ahead:
            return
        with self._ahead_lock:
            while self._upcoming and self._upcoming[0].index in self._claimed:
                self._upcoming.popleft()
            if self._stopping:
                return
            if not self._upcoming:
                running = list(self._shared.values())
            else:
                upcoming = self._upcoming.popleft()
                ahead = self._ahead[upcoming.index] = _Ahead()
                running = None
        if running is not None:
            self._help(running)
            return
        try:
            ahead.job = self._share(upcoming.job())
            ahead.handle = self._start_ahead(ahead.job)
        except Exception:
            log.debug("could not start shard %d ahead of its task", upcoming.index, exc_info=True)
            ahead.handle = None
        finally:
            ahead.started.set()

    def run(self, upcoming: Upcoming) -> ShardValues:
        """Explain an expected shard: the one `start_next` started, or (not started, or retried) start it now."""
        with self._ahead_lock:
            ahead = self._ahead.pop(upcoming.index, None)
            if ahead is None:
                self._claimed.add(upcoming.index)
        job: ShardJob | None = None
        try:
            if ahead is not None:
                ahead.started.wait()
                job = ahead.job
            if ahead is None or job is None:  # not started ahead, or its rows could not be read ahead: here
                job = self._share(upcoming.job())
                return self._together(job, self.compute(job))
            if ahead.handle is None:  # read, but not started
                return self._together(job, self.compute(job))
            return self._together(job, self._finish(ahead.handle, job))
        except BaseException:
            shared = self._unshare(job) if job is not None else None
            if shared is not None:  # its retry shares its rows anew, with claims of its own
                self._release(shared.claims)
            raise

    def _share(self, job: ShardJob) -> ShardJob:
        """`job` with claims other workers can share its rows by, where this runner's workers can (Kernel
        SHAP, two rows or more); registered as running, so a worker with nothing to start helps it."""
        if not self.starts_ahead or not isinstance(job, ShardJob) or job.algorithm != "kernel":
            return job
        if len(job.rows) < _SHARE_MIN_ROWS:
            return job
        claims = self._claims(len(job.rows))
        if claims is None:
            return job
        job = dataclasses.replace(job, claims=claims)
        with self._ahead_lock:
            previous = self._shared.get(job.index)
            self._shared[job.index] = _Shared(job, claims)
        if previous is not None:  # an earlier try of this shard
            self._close(previous)
            self._release(previous.claims)
        return job

    def _help(self, running: list[_Shared]) -> None:
        """Start a helper on the running shard with the most rows unclaimed, if any has one. Never raises."""
        shared = max(running, key=_Shared.left, default=None)
        if shared is None or shared.left() < 1:
            return
        with shared.lock:
            if shared.closed:
                return
            try:
                shared.claims.join()
                handle = self._start_ahead(shared.job)
            except Exception:
                log.debug("could not start a helper on shard %d", shared.job.index, exc_info=True)
                return
            if handle is not None:
                shared.helpers.append(handle)

    def _together(self, job: ShardJob, values: ShardValues) -> ShardValues:
        """The shard's values with its helpers' rows put in: every helper is waited for as the shard was."""
        shared = self._unshare(job)
        if shared is None:
            return values
        try:
            if values.computed is None:
                return values
            own = int(values.computed.sum())
            for handle in shared.helpers:
                values.take_rows(self._finish(handle, job))
            values.helped_rows = int(values.computed.sum()) - own
            if not values.computed.all():
                raise ShardWorkerLost(
                    f"{shard_label(job.index, job.row_ids)}: {int((~values.computed).sum())} rows were claimed "
                    "by a worker that did not return them"
                )
            values.computed = None
            return values
        finally:
            self._release(shared.claims)  # put together, or failed: a worker of this try claims nothing more

    def _unshare(self, job: ShardJob) -> _Shared | None:
        """No worker joins this try of the shard any more (it is being put together, or it failed and its
        retry shares its rows anew): its record, closed, or None if its rows were not shared."""
        with self._ahead_lock:
            shared = self._shared.get(job.index)
            if shared is None or shared.job is not job:
                return None
            del self._shared[job.index]
        self._close(shared)
        return shared

    @staticmethod
    def _close(shared: _Shared) -> None:
        with shared.lock:
            shared.closed = True

    def _refuse_if_stopped(self, job: ShardJob) -> None:
        """A shard that starts (or is retried) after stop() is abandoned at once, never sent to a worker."""
        if self._stopping:
            raise ShardAbandoned(f"{shard_label(job.index, job.row_ids)}: the run stopped before it started")

    def _wait(self, pending: _Pending, job: ShardJob) -> None:
        """Return once the shard's result is in; ShardTimeout after timeout_s, ShardAbandoned on stop()."""
        woken = threading.Event()
        pending.add_done_callback(lambda _: woken.set())
        with self._waiting_lock:
            stopping = self._stopping
            self._waiting.add(woken)
        try:
            if not stopping:
                woken.wait(min(self.timeout_s, threading.TIMEOUT_MAX))
        finally:
            with self._waiting_lock:
                self._waiting.discard(woken)
        if pending.done():
            return
        if self._stopping:
            raise ShardAbandoned(f"{shard_label(job.index, job.row_ids)}: the run stopped while it waited")
        raise ShardTimeout(
            f"{shard_label(job.index, job.row_ids)}: no result within shards.timeout_s = "
            f"{self.timeout_s:g} s (the model did not return); raise shards.timeout_s for slow models"
        )

    def stop(self) -> None:
        """Give up on the shards in flight (the run is ending on a signal): every wait ends now, and a
        model call that will not return is left behind (a thread) or killed (a pool's worker)."""
        with self._waiting_lock:
            self._stopping = True
            for woken in self._waiting:
                woken.set()

    def prepare(self, algorithm: str) -> None:  # noqa: B027 - most runners need nothing
        """The run's shards will use `algorithm` (config.explainer.algorithm, then the plan's): start what
        they will need now, beside the run's other work (wait_ready waits for it)."""

    def wait_ready(self) -> None:  # noqa: B027 - threads and a Dask cluster are ready once constructed
        """Return once the workers can take shards (a process pool starts beside the run)."""

    def close(self) -> None:  # noqa: B027 - a runner may hold nothing
        """Stop the run's workers and free its limits."""

    def __enter__(self) -> ShardRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_THREAD_NUMBERS = itertools.count(1)


class _ShardThreads:
    """Daemon threads that compute one shard at a time each and then wait for the next.

    A thread cannot be killed: a model call that never returns is abandoned after timeout_s, so the threads
    are daemons (an executor's would be joined at exit, forever) and one that is stuck is never handed
    another shard. A thread that finished is reused, keeping what the kernel engine keeps per thread (its
    buffers) for the next shard.
    """

    def __init__(self) -> None:
        self._idle: list[queue.SimpleQueue[Callable[[], Callable[[], None] | None] | None]] = []
        self._lock = threading.Lock()

    def run(self, work: Callable[[], Callable[[], None] | None]) -> None:
        """Run `work` on an idle thread, or a new one; what it returns is called once the thread is idle."""
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
            if inbox is None:
                inbox = queue.SimpleQueue()
                name = f"{SHARD_THREAD}-{next(_THREAD_NUMBERS)}"
                threading.Thread(target=self._serve, args=(inbox,), name=name, daemon=True).start()
        inbox.put(work)

    def _serve(self, inbox: queue.SimpleQueue[Callable[[], Callable[[], None] | None] | None]) -> None:
        while (work := inbox.get()) is not None:
            publish = work()
            with self._lock:
                self._idle.append(inbox)
            if publish is not None:  # once this thread is idle: a shard started next finds it free
                publish()

    def close(self) -> None:
        """Let the idle threads end (a stuck one ends with the process)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for inbox in idle:
            inbox.put(None)


def _warm_compiled() -> None:
    """Load the kernel engine's compiled code and take its first explain's first-time costs (warm_up)."""
    from shapline.tasks.explainers import kernel_engine

    kernel_engine.warm_up()


def _warm(work: list[Callable[[], None]]) -> None:
    """Do a shard's first-time work ahead of the shards; a failure here is the first shard's to report, if it
    recurs."""
    for step in work:
        try:
            step()
        except Exception:
            log.debug("could not do %s ahead of the shards", getattr(step, "__name__", step), exc_info=True)


class ThreadRunner(ShardRunner):
    """Shards computed on threads of the flow's process (shards.runner thread), one shard per thread at a time."""

    starts_ahead = True

    def __init__(
        self,
        limit: RequestLimit | None,
        timeout_s: float = _DEFAULT_TIMEOUT_S,
        threads: int | None = None,
        workers: int = 1,
    ) -> None:
        super().__init__(timeout_s)
        self.limit = limit
        self.workers = workers  # shard tasks at once (the flow's); with two or more, they help each other
        # The native threads each shard may use (threads_per_worker); None leaves them as they are.
        self.threads = threads
        self._threads = _ShardThreads()
        self._warming: list[threading.Thread] = []
        self._prepared: set[str] = set()

    def prepare(self, algorithm: str) -> None:
        """Do on a thread now, beside loading and validation, what the first shard would otherwise do: cap
        the native threads (threadpoolctl reads every library the flow's process loaded, ~20 ms) and, for
        Kernel SHAP, load the engine's compiled code (~0.5 s and ~50 MB: LLVM; a run that explains
        otherwise never loads it)."""
        work: list[Callable[[], None]] = []
        if self.threads is not None and "threads" not in self._prepared:
            self._prepared.add("threads")
            work.append(functools.partial(limit_native_threads, self.threads))
        if algorithm == "kernel" and "kernel" not in self._prepared:
            self._prepared.add("kernel")
            work.append(_warm_compiled)
        if work:
            thread = threading.Thread(target=_warm, args=(work,), name="shapline-warm-up", daemon=True)
            thread.start()
            self._warming.append(thread)

    def wait_ready(self) -> None:
        for thread in self._warming:
            thread.join()

    def compute(self, job: ShardJob) -> ShardValues:
        # The task's context (its Prefect run, its logger).
        return self._finish(self._start(job, contextvars.copy_context()), job)

    def _claims(self, rows: int) -> RowClaims | None:
        return SharedRows(rows) if self.workers > 1 else None

    def _start_ahead(self, job: ShardJob) -> Future[ShardValues]:
        return self._start(job, self._flow_context.copy())

    def _start(self, job: ShardJob, context: contextvars.Context) -> Future[ShardValues]:
        self._refuse_if_stopped(job)
        # Made here and set by the shard's thread, as an executor does: the task waits on it with a timeout.
        outcome: Future[ShardValues] = Future()

        def explain() -> Callable[[], None]:
            outcome.set_running_or_notify_cancel()
            try:
                values = context.run(explain_shard, job, self.limit)
            except BaseException as exc:
                return functools.partial(outcome.set_exception, exc)
            return functools.partial(outcome.set_result, values)

        self._threads.run(explain)
        return outcome

    def _finish(self, outcome: Future[ShardValues], job: ShardJob) -> ShardValues:
        self._wait(outcome, job)
        return outcome.result()

    def close(self) -> None:
        self._threads.close()


# What every pool worker imports; a fork server imports it once and forks the workers from there. shap
# is not among it: kernel shards (shapline's own engine) never need it, others import it when they start.
_PRELOAD = ["shapline.tasks.compute.worker"]
# Set in each pool worker by _start_worker: the run's limit on endpoint requests, shared by the pool, the
# barrier its warm-up calls meet at, and the pool's row counters (PoolRows) with the pool's number.
_worker_limit: RequestLimit | None = None
_worker_warm: Any = None
_worker_counters: Any = None
_worker_pool = -1
_POOL_NUMBERS = itertools.count(1)
# How long a worker's warm-up call waits for the others' (their imports and model loads) before it gives
# up waiting: a pool is ready sooner than that, and a worker that dies breaks the pool anyway.
_WARM_UP_WAIT_S = 120.0


def _pool_context() -> multiprocessing.context.BaseContext:
    """forkserver where the platform has it, else spawn; never plain fork from the threaded flow process.

    The fork server is a fresh single-threaded process that imports the shard code once; each worker is a
    fork of it, so N workers cost one import rather than N, and a pool replaced after a crash is back at
    once.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)  # no effect once the server runs, which is fine
        return context
    return multiprocessing.get_context("spawn")


# A slot of a pool's counters: the next row to claim, whether a helper joined, which claims hold it.
_SLOT_WIDTH = 3


class PoolRows:
    """A shard's rows shared by the processes of one pool: its counter is a slot of the pool's shared array
    (a lock and shared memory, which a process gets when it starts: a job cannot carry them): the next row to
    claim, whether a helper joined, and which try of which shard holds the slot.

    A slot is freed as soon as its try is put together or fails, even while a worker of a failed try is still
    claiming: once the slot serves another try, such a worker finds every row taken. In a worker of another
    pool (the one it was made for was replaced), every row is the job's own.
    """

    def __init__(self, counters: Any, pool: int, slot: int, rows: int, holder: int = 0) -> None:
        self.pool, self.slot, self.rows, self.holder = pool, slot, rows, holder
        self._counters = counters
        self._alone: AllRows | None = None

    def __getstate__(self) -> dict[str, int]:
        return {"pool": self.pool, "slot": self.slot, "rows": self.rows, "holder": self.holder}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.pool, self.slot, self.rows = state["pool"], state["slot"], state["rows"]
        self.holder = state["holder"]
        mine = state["pool"] == _worker_pool and _worker_counters is not None
        self._counters = _worker_counters if mine else None
        self._alone = None if mine else AllRows(self.rows)

    def take(self, count: int) -> range:
        if self._alone is not None:
            return self._alone.take(count)
        at = _SLOT_WIDTH * self.slot
        with self._counters.get_lock():
            if self._counters[at + 2] != self.holder:  # the slot serves another try now
                return range(self.rows, self.rows)
            start = self._counters[at]
            stop = self._counters[at] = start + share_of(
                self.rows - start, count, bool(self._counters[at + 1])
            )
        return range(start, stop)

    def left(self) -> int:
        if self._alone is not None:
            return self._alone.left()
        at = _SLOT_WIDTH * self.slot
        with self._counters.get_lock():
            if self._counters[at + 2] != self.holder:
                return 0
            return int(self.rows - self._counters[at])

    def join(self) -> None:
        if self._alone is not None:
            return
        at = _SLOT_WIDTH * self.slot
        with self._counters.get_lock():
            if self._counters[at + 2] == self.holder:
                self._counters[at + 1] = 1


class _PoolCounters:
    """A pool's row counters, one slot per shard whose rows its workers share, and which slots are free."""

    def __init__(self, context: multiprocessing.context.BaseContext, slots: int) -> None:
        self.number = next(_POOL_NUMBERS)
        self.array = context.Array("q", _SLOT_WIDTH * slots)
        self._free = list(range(slots))
        self._holders = itertools.count(1)
        self._lock = threading.Lock()

    def claims(self, rows: int) -> PoolRows | None:
        with self._lock:
            if not self._free:
                return None
            slot, holder = self._free.pop(), next(self._holders)
        at = _SLOT_WIDTH * slot
        with self.array.get_lock():
            self.array[at], self.array[at + 1], self.array[at + 2] = 0, 0, holder
        return PoolRows(self.array, self.number, slot, rows, holder)

    def release(self, claims: PoolRows) -> None:
        if claims.pool == self.number:
            with self._lock:
                self._free.append(claims.slot)


def _start_worker(
    limit: RequestLimit | None,
    model: ModelConfig,
    threads: int | None,
    environment: dict[str, str],
    warm: Any = None,
    counters: Any = None,
    pool: int = -1,
) -> None:
    """A pool worker's first act: take the flow's environment, the run's request limit and the pool's warm-up
    barrier, import what a shard needs, load the model.

    Workers are forks of a fork server started with the flow process's first pool, so without this they
    would see the environment of that moment (AWS_*, MLFLOW_*), not the run's. It must never raise: a
    failing initializer breaks the pool; the shard that needs the model reports a load error itself.
    """
    global _worker_limit, _worker_warm, _worker_counters, _worker_pool
    os.environ.clear()
    os.environ.update(environment)
    _worker_limit, _worker_warm = limit, warm
    _worker_counters, _worker_pool = counters, pool
    try:
        from shapline.tasks.compute.worker import compute_only
        from shapline.tasks.models.loading import load_predictor

        compute_only()  # a spawned worker (no fork server) did not import the preload
        predictor = load_predictor(model)
        if threads is not None:
            predictor.limit_threads(threads)
            # Finding the BLAS/OpenMP libraries takes a while: paid here, while the flow validates the data.
            limit_native_threads(threads)
    except Exception:
        log.debug("warm-up could not load model %s", model.name, exc_info=True)


def _ready() -> None:
    """Submitted once per worker so the pool starts every worker now, not on the first shards; done once
    every worker has run its initializer. Each call waits at the pool's barrier until one call per worker
    is there: without it the first worker ready answered every call, and the explain phase began while
    the others still imported and loaded the model (the first shards waited ~0.5 s for them)."""
    if _worker_warm is not None:
        with contextlib.suppress(threading.BrokenBarrierError):
            _worker_warm.wait(_WARM_UP_WAIT_S)


def _explain_in_worker(job: ShardJob, sent: object = None) -> ShardValues:  # `sent`: a _Sent, arrived as None
    return explain_shard(job, _worker_limit)


class _Sent:
    """Submitted beside a shard's job: pickling it (the pool's feeder thread, once the job is on its way to
    a worker) sets `event`; it arrives as None."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        self.event.set()
        return (_none, ())


def _none() -> None:
    return None


# How long a shard started ahead waits for its job to leave for a worker (see ProcessRunner._start_ahead).
_SEND_WAIT_S = 0.1


class ProcessRunner(ShardRunner):
    """A pool of `workers` processes (shards.runner process), started and warmed with the run.

    A worker that dies (OOM kill, segfault, kill -9), whether warming up, idle or mid-shard, breaks
    the pool: the first shard to notice starts a new pool; a shard that had not started yet is sent
    to it at once, a shard that was running fails as ShardWorkerLost and its task retries.
    """

    starts_ahead = True

    def __init__(
        self,
        workers: int,
        model: ModelConfig,
        threads: int | None,
        concurrency: int | None,
        timeout_s: float = _DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__(timeout_s)
        self.workers = workers
        self.model = model
        self.threads = threads
        self.concurrency = concurrency
        self._lock = threading.Lock()
        self._closed = False
        self._executor: ProcessPoolExecutor | None = None
        self._counters: _PoolCounters | None = None
        self._warming: list[Future[None]] = []
        self._start_error: Exception | None = None
        # Creating the pool blocks until the fork server has imported the shard code (on a process's first
        # pool): on a thread of its own it overlaps loading and validation.
        self._started = threading.Event()
        threading.Thread(target=self._start_first, name="shapline-pool-start", daemon=True).start()

    def _start_first(self) -> None:
        try:
            executor = self._start()
        except Exception as exc:  # raised where a shard needs the pool (and so ends the run)
            self._start_error = exc
        else:
            with self._lock:
                self._executor = executor
        finally:
            self._started.set()

    def wait_ready(self) -> None:
        self._started.wait()
        # A worker that died warming up broke the pool: the first shard finds out and starts a new one.
        futures.wait(self._warming)

    def _running(self) -> ProcessPoolExecutor:
        """The pool, once started; the error that stopped it starting, if one did."""
        self._started.wait()
        with self._lock:
            if self._executor is None:
                raise self._start_error or ShardWorkerLost("the worker pool did not start")
            return self._executor

    def _start(self) -> ProcessPoolExecutor:
        context = _pool_context()
        # A new pool gets a new limit and new row counters: slots a dead worker held die with the old one.
        limit = ProcessLimit(self.concurrency, context) if self.concurrency else None
        # Shards sharing their rows at once: one per worker and one started ahead of each, with room to spare
        # (a try frees its slot as it ends, put together or failed; helpers take none).
        counters = self._counters = _PoolCounters(context, 4 * self.workers + 4)
        executor = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=context,
            initializer=_start_worker,
            initargs=(
                limit,
                self.model,
                self.threads,
                environment(),
                context.Barrier(self.workers),
                counters.array,
                counters.number,
            ),
        )
        # The pool starts a worker per submission while none is idle: these start all of them now, and
        # are done once every worker has run its initializer (imports, model, threads).
        self._warming = [executor.submit(_ready) for _ in range(self.workers)]
        return executor

    def _replace(
        self, broken: ProcessPoolExecutor, why: str = "a shard worker process died"
    ) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise ShardWorkerLost("the run's worker pool is closed")
            current = self._executor
            if current is broken or current is None:  # not replaced yet by another shard
                log.warning("%s; starting a new pool", why)
                _kill_workers(broken)  # a worker stuck in a model call never takes the shutdown's sentinel
                broken.shutdown(wait=False, cancel_futures=True)
                current = self._executor = self._start()
            return current

    def compute(self, job: ShardJob) -> ShardValues:
        return self._finish(self._submit(job), job)

    def _claims(self, rows: int) -> PoolRows | None:
        if self.workers < 2:
            return None
        self._started.wait()
        with self._lock:
            counters = self._counters
        return counters.claims(rows) if counters is not None else None

    def _release(self, claims: RowClaims) -> None:
        with self._lock:
            counters = self._counters
        if counters is not None and isinstance(claims, PoolRows):
            counters.release(claims)

    def _start_ahead(self, job: ShardJob) -> tuple[ProcessPoolExecutor, Future[ShardValues]]:
        # The pool's manager and feeder threads hand the job to a worker, and each needs this process's GIL.
        # Right after a shard starts ahead, Prefect's threads want it too (starting the shard tasks, ending the
        # task that started this one), and the job's pickling waited up to 18 ms while its worker idled.
        # Waiting here, with the GIL released, sends it first: a worker's wait between two shards went from a
        # median 11.8 ms to 7.6 (two process workers, 29-34 hand-offs each way).
        sent = threading.Event()
        handle = self._submit(job, _Sent(sent))
        sent.wait(_SEND_WAIT_S)
        return handle

    def _submit(
        self, job: ShardJob, sent: _Sent | None = None
    ) -> tuple[ProcessPoolExecutor, Future[ShardValues]]:
        self._refuse_if_stopped(job)
        executor = self._running()
        future: Future[ShardValues] | None = None
        for _ in range(2):
            try:
                future = executor.submit(_explain_in_worker, job, sent)
                break
            except BrokenProcessPool:
                # The pool broke before this shard reached it (a worker died warming up or idle).
                executor = self._replace(executor)
            except RuntimeError:  # "cannot schedule new futures after shutdown": stop() shut the pool
                self._refuse_if_stopped(job)
                raise
        if future is None:
            raise ShardWorkerLost(f"shard {job.index}: the worker pool broke twice before the shard started")
        return executor, future

    def _finish(self, handle: tuple[ProcessPoolExecutor, Future[ShardValues]], job: ShardJob) -> ShardValues:
        executor, future = handle
        if future.cancelled():  # started ahead in a pool replaced before a worker took it: never ran
            executor, future = self._submit(job)
        try:
            self._wait(future, job)
        except ShardTimeout:
            # The worker is stuck in the model: only killing it frees it, which breaks the pool (the other
            # shards running on it are retried), so the retry gets a fresh worker.
            with contextlib.suppress(ShardWorkerLost):  # the run's pool is closed: nothing to replace
                self._replace(executor, f"shard {job.index} timed out (shards.timeout_s)")
            raise
        try:
            return future.result()
        except BrokenProcessPool as exc:
            self._refuse_if_stopped(job)  # stop() killed the workers: nothing to retry
            self._replace(executor)
            raise ShardWorkerLost(f"shard {job.index}: a worker process died while it ran ({exc})") from exc

    def stop(self) -> None:
        super().stop()
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            _kill_workers(executor)
            executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._started.wait()
        with self._lock:
            self._closed = True
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)


def _kill_workers(executor: ProcessPoolExecutor) -> None:
    """SIGKILL a pool's worker processes (ProcessPoolExecutor has no public way to name them)."""
    processes: dict[int, Any] = getattr(executor, "_processes", None) or {}
    for process in list(processes.values()):
        with contextlib.suppress(OSError, ValueError):  # already gone, or its handle closed
            process.kill()


class DaskRunner(ShardRunner):
    """Shards on a Dask cluster (shards.runner dask): the one at shards.address, or a local one of `workers`.

    Jobs travel to the workers and values come back through the cluster; a worker needs the model
    (the same file path, or a registry or endpoint it can reach) and the same packages, nothing else.
    Dask itself moves a task off a worker that dies.
    """

    def __init__(self, shards: ShardsConfig, concurrency: int | None, name: str) -> None:
        from distributed import Client, LocalCluster

        super().__init__(shards.timeout_s)
        self.cluster: Any = None
        if shards.address:
            try:
                self.client = Client(shards.address, timeout="30s", set_as_default=False)
            except (OSError, TimeoutError) as exc:
                raise ShaplineError(
                    f"shards.address: cannot reach the Dask scheduler at {shards.address}: {exc}"
                ) from exc
        else:
            # One thread per worker process: SHAP's numpy work is single-threaded per shard.
            self.cluster = LocalCluster(
                n_workers=shards.workers,
                threads_per_worker=1,
                processes=True,
                # Any free port: Dask's default 8787 clashes with any other cluster on the machine.
                dashboard_address=":0",
                silence_logs=logging.WARNING,
            )
            self.client = Client(self.cluster, set_as_default=False)
        self.limit: DaskLimit | None = None
        if concurrency:
            self.limit = DaskLimit(concurrency, f"shapline-{name}-{uuid.uuid4().hex[:8]}")
            self._semaphore = self._register(self.limit)

    def _register(self, limit: DaskLimit) -> Any:
        from distributed import Semaphore

        return Semaphore(
            max_leases=limit.limit,
            name=limit.name,
            scheduler_rpc=self.client.scheduler,
            loop=self.client.loop,
        )

    def compute(self, job: ShardJob) -> ShardValues:
        from distributed import KilledWorker

        self._refuse_if_stopped(job)
        future = self.client.submit(
            explain_shard, job, self.limit, pure=False, key=f"explain-shard-{job.index}-{uuid.uuid4().hex}"
        )
        try:
            self._wait(future, job)
        except ShardTimeout:
            # Dask cannot interrupt a running task: cancelling releases it, and its worker is freed only
            # when the model returns (a local cluster's workers end with the run).
            future.cancel()
            raise
        try:
            return future.result()
        except KilledWorker as exc:
            raise ShardWorkerLost(f"shard {job.index}: Dask workers running it kept dying ({exc})") from exc

    def close(self) -> None:
        try:
            if self.limit is not None:
                self._semaphore.close()
        finally:
            self.client.close()
            if self.cluster is not None:
                self.cluster.close()


def open_runner(shards: ShardsConfig, model: ModelConfig, threads: int | None, name: str) -> ShardRunner:
    """The runner shards.runner asks for, with model.endpoint.max_concurrency as the run's request limit."""
    concurrency = model.endpoint.max_concurrency if isinstance(model, SageMakerModel) else None
    if shards.runner == "process":
        return ProcessRunner(shards.workers, model, threads, concurrency, shards.timeout_s)
    if shards.runner == "dask":
        return DaskRunner(shards, concurrency, name)
    return ThreadRunner(
        ThreadLimit(concurrency) if concurrency else None, shards.timeout_s, threads, shards.workers
    )
