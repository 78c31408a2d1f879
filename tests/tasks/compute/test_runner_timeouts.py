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
