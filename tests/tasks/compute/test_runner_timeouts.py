"""A shard's wait for its values: bounded by shards.timeout_s, and over at once when the run stops."""

from __future__ import annotations

import threading
import time
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest

from shapline.tasks.compute import runners
from shapline.tasks.compute.runners import SHARD_THREAD, ShardAbandoned, ShardTimeout, ThreadRunner
from shapline.tasks.compute.shards import ShardJob


class Job:
    """What a runner reads of a job when it waits: its index and row ids."""

    index = 3
    row_ids = np.array([300, 301, 399])


def never_returns(release: threading.Event) -> Any:
    def explain(job: ShardJob, limit: Any) -> Any:
        release.wait()
        return "values"

    return explain


def test_a_shard_past_its_timeout_fails_as_a_fault_naming_the_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    monkeypatch.setattr(runners, "explain_shard", never_returns(release))
    started = time.monotonic()
    before = set(threading.enumerate())
    with pytest.raises(ShardTimeout) as caught:
        ThreadRunner(None, timeout_s=0.2).compute(cast(ShardJob, Job()))
    assert time.monotonic() - started < 5
    assert str(caught.value) == (
        "shard 3 (rows 300-399): no result within shards.timeout_s = 0.2 s (the model did not return); "
        "raise shards.timeout_s for slow models"
    )
    assert caught.value.transient  # a fault: the shard task retries it
    # The thread left in the model is a daemon: the interpreter does not wait for it at exit.
    [stuck] = [t for t in set(threading.enumerate()) - before if t.name.startswith(SHARD_THREAD)]
    assert stuck.daemon
    release.set()
    stuck.join(5)


def test_a_shard_in_time_returns_its_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runners, "explain_shard", lambda job, limit: pd.DataFrame({"v": [job.index]}))
    values = ThreadRunner(None, timeout_s=30).compute(cast(ShardJob, Job()))
    assert values["v"].tolist() == [3]


def test_an_error_in_the_shard_is_raised_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(job: ShardJob, limit: Any) -> Any:
        raise ValueError("could not convert string to float: 'abc'")

    monkeypatch.setattr(runners, "explain_shard", fails)
    with pytest.raises(ValueError, match="could not convert"):
        ThreadRunner(None, timeout_s=30).compute(cast(ShardJob, Job()))


def test_stop_ends_a_wait_at_once_and_refuses_later_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    monkeypatch.setattr(runners, "explain_shard", never_returns(release))
    runner = ThreadRunner(None, timeout_s=600)
    errors: list[BaseException] = []

    def compute() -> None:
        try:
            runner.compute(cast(ShardJob, Job()))
        except BaseException as exc:
            errors.append(exc)

    waiting = threading.Thread(target=compute)
    waiting.start()
    deadline = time.monotonic() + 5
    while not runner._waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    runner.stop()
    waiting.join(5)
    assert not waiting.is_alive()
    [error] = errors
    assert isinstance(error, ShardAbandoned) and not error.transient  # never retried
    with pytest.raises(ShardAbandoned, match="before it started"):
        runner.compute(cast(ShardJob, Job()))
    release.set()


def test_a_shard_waits_for_a_slot_and_its_timeout_counts_from_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker, four callers at once (the flow runs a shard task ahead): one shard computes at a
    time, each starts as the one before returns, and a shard that waited longer than shards.timeout_s
    for its slot (the last, 1.2 s) is not timed out for it."""
    running, most, spans = [0], [0], []
    lock = threading.Lock()

    def explain(job: ShardJob, limit: Any) -> Any:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        started = time.monotonic()
        time.sleep(0.4)
        with lock:
            running[0] -= 1
        spans.append((started, time.monotonic()))
        return "values"

    monkeypatch.setattr(runners, "explain_shard", explain)
    runner = ThreadRunner(None, timeout_s=0.9, workers=1)
    assert runner.queued_ahead == 1
    results: list[object] = []

    def call() -> None:
        try:
            results.append(runner.compute(cast(ShardJob, Job())))
        except BaseException as exc:
            results.append(exc)

    callers = [threading.Thread(target=call) for _ in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(10)
    assert results == ["values"] * 4 and most[0] == 1
    spans.sort()
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))


def test_stop_ends_a_wait_for_a_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    monkeypatch.setattr(runners, "explain_shard", never_returns(release))
    runner = ThreadRunner(None, timeout_s=600, workers=1)
    errors: list[BaseException] = []

    def compute() -> None:
        try:
            runner.compute(cast(ShardJob, Job()))
        except BaseException as exc:
            errors.append(exc)

    first, queued = threading.Thread(target=compute), threading.Thread(target=compute)
    first.start()
    deadline = time.monotonic() + 5
    while not runner._waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    queued.start()
    time.sleep(0.3)  # the second is waiting for the slot the first holds
    runner.stop()
    first.join(5)
    queued.join(5)
    assert not first.is_alive() and not queued.is_alive()
    assert len(errors) == 2 and all(isinstance(e, ShardAbandoned) for e in errors)
    release.set()


def test_a_timed_out_shard_frees_its_slot_for_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread stuck in the model gives its slot back when its shard times out: the retry runs."""
    release, calls = threading.Event(), []

    def explain(job: ShardJob, limit: Any) -> Any:
        calls.append(job)
        if len(calls) == 1:
            release.wait()
        return "values"

    monkeypatch.setattr(runners, "explain_shard", explain)
    runner = ThreadRunner(None, timeout_s=0.3, workers=1)
    with pytest.raises(ShardTimeout):
        runner.compute(cast(ShardJob, Job()))
    assert runner.compute(cast(ShardJob, Job())) == "values"
    release.set()
