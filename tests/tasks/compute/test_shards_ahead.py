"""A shard task that has written its values starts the next shard on the worker it freed (start_next); the
next task finds it running (run). Every shard is computed once, in order, and a shard whose task asked
first is never started ahead."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression

from shapline.tasks.common.config import ExplainerConfig, ShardsConfig, SklearnModel
from shapline.tasks.compute import runners
from shapline.tasks.compute.runners import ShardAbandoned, ShardRunner, ThreadRunner, open_runner
from shapline.tasks.compute.shards import ShardJob
from shapline.tasks.data.background import Background


@dataclass(frozen=True)
class Job:
    """What a runner reads of a job: its index and row ids."""

    index: int

    @property
    def row_ids(self) -> np.ndarray:
        return np.array([10 * self.index, 10 * self.index + 1])


@dataclass
class Upcoming:
    """A staged shard: its job read when asked (counted)."""

    index: int
    reads: list[int]

    def job(self) -> ShardJob:
        self.reads.append(self.index)
        return cast(ShardJob, Job(self.index))


class Recorder:
    """explain_shard for the thread runner: records which shard started when, on which thread."""

    def __init__(self, seconds: float = 0.05, fails: set[int] | None = None) -> None:
        self.seconds = seconds
        self.fails = fails or set()
        self.started: dict[int, list[tuple[float, str]]] = {}
        self.lock = threading.Lock()

    def __call__(self, job: ShardJob, limit: Any) -> Any:
        with self.lock:
            self.started.setdefault(job.index, []).append((time.monotonic(), threading.current_thread().name))
        time.sleep(self.seconds)
        if job.index in self.fails:
            raise ValueError(f"shard {job.index} cannot be explained")
        return f"values {job.index}"


def test_a_finished_shard_starts_the_next_on_its_thread_before_the_next_task_asks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder()
    monkeypatch.setattr(runners, "explain_shard", recorder)
    reads: list[int] = []
    upcoming = [Upcoming(i, reads) for i in range(4)]
    runner = ThreadRunner(None, timeout_s=30)
    runner.expect(upcoming, start=1)  # one worker: its first shard starts before Prefect starts its task
    time.sleep(0.1)
    asked: dict[int, float] = {}
    for shard in upcoming:  # one task at a time, as one worker's tasks run
        asked[shard.index] = time.monotonic()
        assert runner.run(shard) == f"values {shard.index}"
        runner.start_next()
        time.sleep(0.2)  # Prefect's end of this task and start of the next: the next shard computes meanwhile
    assert sorted(recorder.started) == [0, 1, 2, 3] and all(len(v) == 1 for v in recorder.started.values())
    assert reads == [0, 1, 2, 3]  # each shard's rows read once
    for index in (0, 1, 2, 3):
        [(started, _)] = recorder.started[index]
        assert started < asked[index], f"shard {index} waited for its task"
    # One shard thread for all four: the finished shard's thread took the next.
    assert len({name for v in recorder.started.values() for _, name in v}) == 1
    runner.close()


def test_a_shard_whose_task_asked_first_is_not_started_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two tasks at once (two workers), started by their tasks (start=0): shards 0 and 1 are claimed by
    them; the first to finish starts shard 2, and nothing is started twice."""
    recorder = Recorder(seconds=0.1)
    monkeypatch.setattr(runners, "explain_shard", recorder)
    reads: list[int] = []
    upcoming = [Upcoming(i, reads) for i in range(3)]
    runner = ThreadRunner(None, timeout_s=30)
    runner.expect(upcoming)
    results: dict[int, Any] = {}

    def task(shard: Upcoming) -> None:
        results[shard.index] = runner.run(shard)
        runner.start_next()

    tasks = [threading.Thread(target=task, args=(shard,)) for shard in upcoming[:2]]
    for thread in tasks:
        thread.start()
    for thread in tasks:
        thread.join(10)
    task(upcoming[2])  # finds shard 2 started by whichever finished first
    assert results == {i: f"values {i}" for i in range(3)}
    assert {i: len(v) for i, v in recorder.started.items()} == {0: 1, 1: 1, 2: 1}
    assert sorted(reads) == [0, 1, 2]
    runner.start_next()  # nothing left: starts nothing
    assert len(recorder.started) == 3
    runner.close()


def after_first_shard(
    monkeypatch: pytest.MonkeyPatch, recorder: Recorder
) -> tuple[ThreadRunner, list[Upcoming]]:
    """A thread runner expecting two shards, the first computed by its task."""
    monkeypatch.setattr(runners, "explain_shard", recorder)
    upcoming = [Upcoming(i, []) for i in range(2)]
    runner = ThreadRunner(None, timeout_s=30)
    runner.expect(upcoming)
    runner.run(upcoming[0])
    return runner, upcoming


def test_a_shard_started_ahead_fails_as_it_would_have_and_its_retry_computes_it_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder(fails={1})
    runner, upcoming = after_first_shard(monkeypatch, recorder)
    runner.start_next()
    with pytest.raises(ValueError, match="shard 1 cannot be explained"):
        runner.run(upcoming[1])
    with pytest.raises(ValueError, match="shard 1 cannot be explained"):
        runner.run(upcoming[1])  # the task's retry: computed again, not the first try's outcome
    assert len(recorder.started[1]) == 2
    runner.close()


def test_a_stopped_runner_starts_nothing_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder()
    runner, upcoming = after_first_shard(monkeypatch, recorder)
    runner.stop()
    runner.start_next()
    time.sleep(0.1)
    assert list(recorder.started) == [0]
    with pytest.raises(ShardAbandoned, match="before it started"):
        runner.run(upcoming[1])


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[SklearnModel, pd.DataFrame]:
    bunch = load_breast_cancer(as_frame=True)
    rows = bunch.data.iloc[:, :5]
    path = Path(tmp_path_factory.mktemp("ahead")) / "model.joblib"
    joblib.dump(LogisticRegression(max_iter=500).fit(rows, bunch.target), path)
    return SklearnModel(name="ahead", kind="sklearn", path=str(path)), rows


@pytest.fixture
def pool(model: tuple[SklearnModel, pd.DataFrame]) -> Iterator[ShardRunner]:
    with open_runner(ShardsConfig(runner="process", workers=1), model[0], 1, "ahead") as opened:
        opened.wait_ready()
        yield opened


@dataclass
class StagedShard:
    index: int
    settings: ShardJob

    def job(self) -> ShardJob:
        rows = self.settings.rows.iloc[3 * self.index : 3 * self.index + 3]
        return ShardJob(self.index, rows, *[getattr(self.settings, f) for f in _SETTINGS])


_SETTINGS = ("background", "model", "explainer", "algorithm", "link", "threads", "outputs")


def kernel_job(model: tuple[SklearnModel, pd.DataFrame], index: int, rows: int) -> ShardJob:
    """Shard `index` of the model's first `rows` rows: Kernel SHAP, 10 background rows, 40 coalitions."""
    config, frame = model
    return ShardJob(
        index,
        frame.iloc[:rows],
        Background(frame=frame.iloc[100:110]),
        config,
        ExplainerConfig(nsamples=40, l1_reg=False),
        "kernel",
        "logit",
        1,
        2,
    )


def test_a_pools_worker_takes_the_next_shard_ahead_with_the_values_computed_alone(
    pool: ShardRunner, model: tuple[SklearnModel, pd.DataFrame]
) -> None:
    settings = kernel_job(model, -1, 9)
    upcoming = [StagedShard(i, settings) for i in range(3)]
    alone = [pool.compute(shard.job()).values for shard in upcoming]
    pool.expect(upcoming)
    started_ahead: list[int] = []
    start = pool._start_ahead

    def spied(job: ShardJob) -> Any:
        started_ahead.append(job.index)
        return start(job)

    pool._start_ahead = spied  # type: ignore[method-assign]
    ahead = []
    for shard in upcoming:
        ahead.append(pool.run(shard).values)
        pool.start_next()
    assert started_ahead == [1, 2]
    assert all(np.array_equal(a, b) for a, b in zip(alone, ahead, strict=True))


def test_a_shard_cancelled_in_a_replaced_pool_before_a_worker_took_it_is_sent_again(
    pool: ShardRunner, model: tuple[SklearnModel, pd.DataFrame]
) -> None:
    """A pool replaced (a timed-out shard's worker killed) cancels the shards it had not handed a worker:
    one started ahead is sent to the new pool when its task asks, not failed as a lost worker."""
    job = kernel_job(model, 0, 3)
    cancelled: Future[Any] = Future()
    assert cancelled.cancel()
    runner = cast(runners.ProcessRunner, pool)
    values = runner._finish((runner._running(), cancelled), job)
    assert np.array_equal(values.values, pool.compute(job).values)
