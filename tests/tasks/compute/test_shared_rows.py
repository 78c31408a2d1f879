"""A worker with no shard left to start helps a Kernel SHAP shard still running: the shard's rows are claimed
by its owner and helpers, each row once, and the values put together equal the shard explained alone."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression

from shapline.tasks.common.config import ExplainerConfig, ShardsConfig, SklearnModel
from shapline.tasks.compute import runners
from shapline.tasks.compute.runners import ShardRunner, ThreadRunner, open_runner
from shapline.tasks.compute.shards import ShardJob, explain_shard
from shapline.tasks.data.background import Background
from shapline.tasks.explainers.claims import AllRows, SharedRows
from shapline.tasks.explainers.explain import ShardValues, explain_rows
from shapline.tasks.models.loading import load_predictor

ESTIMATORS = [
    ExplainerConfig(nsamples=40, l1_reg=False, seed=3),
    ExplainerConfig(estimator="adaptive", nsamples=200, tolerance=0.05, seed=3),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[SklearnModel, pd.DataFrame]:
    bunch = load_breast_cancer(as_frame=True)
    rows = bunch.data.iloc[:, :6]
    path = Path(tmp_path_factory.mktemp("shared")) / "model.joblib"
    joblib.dump(LogisticRegression(max_iter=500).fit(rows, bunch.target), path)
    return SklearnModel(name="shared", kind="sklearn", path=str(path), class_index=1), rows


def kernel_job(model: tuple[SklearnModel, pd.DataFrame], rows: int, explainer: ExplainerConfig) -> ShardJob:
    config, frame = model
    return ShardJob(
        0,
        frame.iloc[:rows],
        Background(frame=frame.iloc[200:210]),
        config,
        explainer,
        "kernel",
        "logit",
        1,
        2,
    )


def assert_same(together: ShardValues, alone: ShardValues) -> None:
    """Equal row for row: coalitions exactly, values to the rounding a model's calls of other sizes give (a
    row's calls are merged with other rows' where workers claimed several at once)."""
    for name in ("values", "model_output", "standard_errors"):
        mine, theirs = getattr(together, name), getattr(alone, name)
        assert (mine is None) == (theirs is None), name
        if mine is not None:
            np.testing.assert_allclose(mine, theirs, rtol=1e-9, atol=1e-12, err_msg=name)
    for name in ("coalitions", "converged"):
        mine, theirs = getattr(together, name), getattr(alone, name)
        assert (mine is None) == (theirs is None), name
        if mine is not None:
            assert np.array_equal(mine, theirs), name
    assert together.model_rows == alone.model_rows


class Alternating:
    """Claims that give the next row to each of two workers in turn, to make the split known."""

    def __init__(self, rows: int) -> None:
        self.shared = SharedRows(rows)
        self.turn = threading.Condition()
        self.next_worker = 0

    def for_worker(self, worker: int) -> Any:
        alternating = self

        class Mine:
            def take(self, count: int) -> range:
                if count <= 0:
                    return range(0)
                with alternating.turn:
                    alternating.turn.wait_for(
                        lambda: alternating.next_worker == worker or not alternating.shared.left(), timeout=10
                    )
                    taken = alternating.shared.take(count)
                    alternating.next_worker = 1 - worker
                    alternating.turn.notify_all()
                    return taken

            def left(self) -> int:
                return alternating.shared.left()

        return Mine()


@pytest.mark.parametrize("explainer", ESTIMATORS, ids=["sampled", "adaptive"])
def test_two_workers_claiming_rows_in_turn_put_together_the_values_of_one(
    model: tuple[SklearnModel, pd.DataFrame], explainer: ExplainerConfig
) -> None:
    explainer = explainer.model_copy(update={"batch_rows": 1})  # a row a call: the turns are rows
    job = kernel_job(model, 9, explainer)
    predictor = load_predictor(job.model)

    def explain(claims: Any = None) -> ShardValues:
        return explain_rows(job.rows, job.background, predictor, explainer, "logit", 1, "kernel", 2, claims)

    alone = explain()
    claims = Alternating(len(job.rows))
    parts: list[ShardValues] = [None, None]  # type: ignore[list-item]

    def work(worker: int) -> None:
        parts[worker] = explain(claims.for_worker(worker))

    threads = [threading.Thread(target=work, args=(w,)) for w in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    owner, helper = parts
    assert owner.computed is not None and helper.computed is not None
    assert owner.computed.tolist() == [True, False] * 4 + [True]  # each row once, by whoever claimed it
    assert not (owner.computed & helper.computed).any()
    assert owner.model_rows < alone.model_rows
    assert owner.model_s > 0 and helper.model_s > 0
    spent = (owner.model_s + helper.model_s, owner.model_cpu_s + helper.model_cpu_s)
    owner.take_rows(helper)
    assert owner.computed.all()
    assert (owner.model_s, owner.model_cpu_s) == spent  # the shard's model time is both workers'
    assert_same(owner, alone)


def test_a_single_engine_with_claims_of_all_rows_is_the_engine_without(
    model: tuple[SklearnModel, pd.DataFrame],
) -> None:
    job = kernel_job(model, 5, ESTIMATORS[0])
    predictor = load_predictor(job.model)
    without = explain_rows(job.rows, job.background, predictor, job.explainer, "logit", 1, "kernel", 2)
    claimed = explain_rows(
        job.rows, job.background, predictor, job.explainer, "logit", 1, "kernel", 2, AllRows(5)
    )
    assert without.computed is None and claimed.computed is not None and claimed.computed.all()
    assert_same(claimed, without)


@dataclass
class Staged:
    index: int
    settings: ShardJob

    def job(self) -> ShardJob:
        return self.settings


def test_a_thread_worker_with_no_shard_to_start_helps_the_running_one(
    model: tuple[SklearnModel, pd.DataFrame], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two thread workers, one shard: the second worker helps from the start; the shard's task gets every row,
    equal to the shard explained alone, and how many rows the helper explained."""
    job = kernel_job(model, 30, ESTIMATORS[0])
    alone = explain_shard(job)
    workers: dict[int, set[str]] = {}

    def slow(job: ShardJob, limit: Any) -> ShardValues:
        assert job.claims is not None
        claims = job.claims

        class Slowly:  # a row every 20 ms, so both workers get some
            def take(self, count: int) -> range:
                time.sleep(0.02)
                taken = claims.take(count)
                workers.setdefault(threading.get_ident(), set()).update(map(str, taken))
                return taken

            def left(self) -> int:
                return claims.left()

        return explain_shard(ShardJob(**{**job.__dict__, "claims": Slowly()}), limit)

    monkeypatch.setattr(runners, "explain_shard", slow)
    runner = ThreadRunner(None, timeout_s=60, workers=2)
    started: list[int] = []
    start = runner._start_ahead

    def spied(shard: ShardJob) -> Any:
        started.append(shard.index)
        return start(shard)

    runner._start_ahead = spied  # type: ignore[method-assign]
    runner.expect([Staged(0, job)], start=2)
    together = runner.run(Staged(0, job))
    assert started == [0, 0]  # the owner and one helper
    assert len(workers) == 2 and all(workers.values())
    assert together.computed is None  # put together: nothing of the parts shows
    assert 0 < together.helped_rows < 30
    assert_same(together, alone)
    runner.close()


def test_shards_of_other_algorithms_and_a_lone_row_are_never_shared(
    model: tuple[SklearnModel, pd.DataFrame],
) -> None:
    runner = ThreadRunner(None, timeout_s=60, workers=2)
    job = kernel_job(model, 4, ESTIMATORS[0])
    assert runner._share(job).claims is not None
    assert ThreadRunner(None, timeout_s=60, workers=1)._share(job).claims is None  # nobody to help
    assert runner._share(ShardJob(**{**job.__dict__, "algorithm": "permutation"})).claims is None
    assert runner._share(ShardJob(**{**job.__dict__, "rows": job.rows.iloc[:1]})).claims is None


@pytest.fixture
def pool(model: tuple[SklearnModel, pd.DataFrame]) -> Iterator[ShardRunner]:
    with open_runner(ShardsConfig(runner="process", workers=2), model[0], 1, "shared") as opened:
        opened.wait_ready()
        yield opened


@pytest.mark.parametrize("explainer", ESTIMATORS, ids=["sampled", "adaptive"])
def test_a_pools_idle_worker_helps_the_one_shard_and_the_values_are_the_shards(
    pool: ShardRunner, model: tuple[SklearnModel, pd.DataFrame], explainer: ExplainerConfig
) -> None:
    """Two process workers, one shard of 120 rows: both explain rows, through counters the pool's processes
    share; the shard put together equals the shard explained alone."""
    job = kernel_job(model, 120, explainer.model_copy(update={"batch_rows": 1}))
    alone = pool.compute(job)
    assert alone.computed is None
    pool.expect([Staged(0, job)], start=2)
    together = pool.run(Staged(0, job))
    assert together.computed is None
    assert 0 < together.helped_rows < 120
    assert_same(together, alone)


def test_a_job_for_a_replaced_pool_explains_every_row_in_the_new_one(
    pool: ShardRunner, model: tuple[SklearnModel, pd.DataFrame]
) -> None:
    """Claims made for a pool that was replaced (a worker died) reach workers of another pool: there the
    job has every row to itself, rather than a counter of a pool that is gone."""
    runner = pool
    assert isinstance(runner, runners.ProcessRunner)
    job = kernel_job(model, 6, ESTIMATORS[0])
    claims = runners.PoolRows(None, pool=-7, slot=0, rows=6)
    values = runner.compute(ShardJob(**{**job.__dict__, "claims": claims}))
    assert values.computed is not None and values.computed.all()
    assert_same(values, runner.compute(job))


def test_a_claim_gets_what_it_asks_until_a_helper_joins_then_at_most_half_of_what_is_left() -> None:
    """Alone, the owner merges as many rows a call as its engine asks for; once a helper joins, a claim leaves
    the other worker at least as many rows as it takes. Threads' and a pool's counters alike."""
    import multiprocessing

    counters = runners._PoolCounters(multiprocessing.get_context("spawn"), 2)
    for rows in (SharedRows(10), counters.claims(10)):
        assert rows is not None
        assert rows.take(4) == range(0, 4) and rows.left() == 6
        rows.join()
        assert rows.take(6) == range(4, 7)
        assert rows.take(1) == range(7, 8)
        assert rows.take(5) == range(8, 9) and rows.take(5) == range(9, 10)
        assert rows.take(1) == range(10, 10) and rows.left() == 0
    claims = counters.claims(3)
    assert claims is not None and counters.claims(3) is None  # two slots, both in use
    counters.release(claims)
    again = counters.claims(3)  # the slot reset: from row 0, no helper joined
    assert again is not None and again.slot == claims.slot and again.take(1) == range(0, 1)
    # A worker of the try that held the slot before (it failed, and was freed at once) claims nothing more.
    assert claims.take(3) == range(3, 3) and claims.left() == 0
    claims.join()
    assert again.take(3) == range(1, 3)


def test_a_helpers_model_error_fails_the_shards_task_and_no_worker_joins_it_after(
    model: tuple[SklearnModel, pd.DataFrame], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model refuses a row a helper claimed: the shard's task raises that error (naming the row), as if
    the owner had met it, and the failed try is closed to helpers (its retry shares its rows anew)."""
    from shapline.tasks.common.errors import ModelError

    job = kernel_job(model, 30, ESTIMATORS[0])
    calls: list[str] = []
    lock = threading.Lock()

    def explain(job: ShardJob, limit: Any) -> ShardValues:
        with lock:
            calls.append("owner" if not calls else "helper")
            mine = calls[-1]
        assert job.claims is not None
        if mine == "helper":
            taken = job.claims.take(1)
            raise ModelError(f"explaining row {taken.start}: the model returned NaN")
        time.sleep(0.2)  # the helper claims its row first
        return explain_shard(job, limit)

    monkeypatch.setattr(runners, "explain_shard", explain)
    runner = ThreadRunner(None, timeout_s=60, workers=2)
    runner.expect([Staged(0, job)], start=2)
    with pytest.raises(ModelError, match=r"explaining row \d+: the model returned NaN"):
        runner.run(Staged(0, job))
    assert calls == ["owner", "helper"]
    assert not runner._shared
    runner.close()


def test_a_pools_failed_tries_free_their_counters_so_later_shards_are_still_shared(
    pool: ShardRunner, model: tuple[SklearnModel, pd.DataFrame]
) -> None:
    """A try that fails in a pool that carries on (the model refused a row: an endpoint's transient error is
    retried so) frees its counter as it fails. More failures than the pool has counters, then a shard whose
    rows the idle worker still helps with."""
    assert isinstance(pool, runners.ProcessRunner)
    job = kernel_job(model, 120, ESTIMATORS[0].model_copy(update={"batch_rows": 1}))
    broken = job.rows.copy()
    broken.iloc[0, 0] = np.nan  # the model refuses it
    failing = ShardJob(**{**job.__dict__, "rows": broken})
    for _ in range(4 * pool.workers + 5):
        with pytest.raises(ValueError, match="contains NaN"):
            pool.run(Staged(0, failing))
    pool.expect([Staged(0, job)], start=2)
    together = pool.run(Staged(0, job))
    assert 0 < together.helped_rows < 120


SENT: list[float] = []


class SlowToSend(AllRows):
    """Every row, as AllRows, but pickling it (in the pool's feeder thread, in this process) takes 50 ms and
    records when it ended."""

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        time.sleep(0.05)
        SENT.append(time.perf_counter())
        return (AllRows, (self.rows,))


def test_a_shard_a_pool_starts_ahead_is_on_its_way_to_a_worker_when_the_start_returns(
    pool: ShardRunner, model: tuple[SklearnModel, pd.DataFrame]
) -> None:
    """start_next returns once the pool has sent the job, not while it still waits for the pool's threads (which
    need the flow's GIL, which Prefect's threads take right after): the worker does not idle meanwhile."""
    assert isinstance(pool, runners.ProcessRunner)
    job = kernel_job(model, 3, ESTIMATORS[0])
    SENT.clear()
    handle = pool._start_ahead(ShardJob(**{**job.__dict__, "claims": SlowToSend(3)}))
    returned = time.perf_counter()
    assert len(SENT) == 1 and SENT[0] <= returned
    values = pool._finish(handle, job)
    assert values.computed is not None and values.computed.all()


def test_a_shards_model_seconds_are_its_calls_time(model: tuple[SklearnModel, pd.DataFrame]) -> None:
    """model_s counts the time inside the model's calls, every call (the background's too), and no more."""
    from shapline.tasks.models.predictors import LocalPredictor

    config, frame = model
    fitted = joblib.load(config.path)

    class Slow:
        """The model, 20 ms slower a call; its class names seen as the model's."""

        classes_ = fitted.classes_
        calls = 0

        def predict_proba(self, rows: Any) -> Any:
            Slow.calls += 1
            time.sleep(0.02)
            return fitted.predict_proba(rows)

    explainer = ESTIMATORS[0].model_copy(update={"batch_rows": 1})
    job = kernel_job(model, 3, explainer)
    started = time.perf_counter()
    values = explain_rows(
        job.rows,
        job.background,
        LocalPredictor("slow", Slow(), "predict_proba"),
        explainer,
        "logit",
        1,
        "kernel",
        2,
    )
    spent = time.perf_counter() - started
    assert Slow.calls >= 4  # the background's call and at least one per row
    assert Slow.calls * 0.02 <= values.model_s <= spent
    # A sleep is no CPU: the calling thread's CPU in the calls is the model's own work, well under a sleep.
    assert 0 < values.model_cpu_s < values.model_s - Slow.calls * 0.015
