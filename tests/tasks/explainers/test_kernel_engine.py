"""KernelEngine against plain shap.KernelExplainer (same inputs and per-row seed), and against exact Shapley."""

from __future__ import annotations

import itertools
import math
import mmap
import subprocess
import sys
import textwrap
import threading
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import shap
from shap.utils._legacy import DenseData

from shapline.tasks.explainers import compiled
from shapline.tasks.explainers.kernel_engine import (
    KernelEngine,
    RowPlan,
    _Buffers,
    _draw_coalitions,
    _seeded,
    _Shuffles,
)

EPS = 1e-7
ATOL = 1e-6


def row_plan(
    engine: KernelEngine, x: pd.DataFrame | pd.Series, seed: int, nsamples: int | str = "auto"
) -> RowPlan:
    """One row's coalitions as `explain` draws them (the engine's own step, without calling the model)."""
    return engine._plan(engine._prepare(engine._as_rows(x)), 0, seed, nsamples)


def synthetic_rows(
    engine: KernelEngine, x: pd.DataFrame, seed: int, nsamples: int | str = "auto"
) -> pd.DataFrame:
    """The synthetic rows one row's model call holds (after its x), as `explain` builds them."""
    data = engine._prepare(engine._as_rows(x))
    batch = engine._batch([engine._plan(data, 0, seed, nsamples)], data, np.arange(1))
    return engine._assemble(*engine._fill(batch, _Buffers())).iloc[1:].reset_index(drop=True)


def plain_shap(
    f: Callable[[np.ndarray], np.ndarray],
    background: pd.DataFrame,
    rows: pd.DataFrame,
    seeds: list[int],
    nsamples: int | str,
    l1_reg: str | bool,
    link: str,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """(rows, features, outputs) from shap: one explainer, np.random.seed(seed) before each row."""
    data = background.to_numpy()
    if weights is not None:
        data = DenseData(data, list(background.columns), None, np.array(weights, dtype=float))
    explainer = shap.KernelExplainer(f, data, link=link)
    values = []
    for x, seed in zip(rows.to_numpy(), seeds, strict=True):
        np.random.seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            phi = explainer.shap_values(x.reshape(1, -1), nsamples=nsamples, l1_reg=l1_reg, silent=True)
        values.append(np.asarray(phi).reshape(len(background.columns), -1))
    return np.stack(values)


def exact_shapley(value: Callable[[tuple[int, ...]], float], m: int) -> np.ndarray:
    """Shapley values of the game `value` (coalition -> payoff) by enumerating every coalition."""
    payoff = {s: value(s) for size in range(m + 1) for s in itertools.combinations(range(m), size)}
    phi = np.zeros(m)
    for i in range(m):
        others = [j for j in range(m) if j != i]
        for size in range(m):
            weight = math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)
            for s in itertools.combinations(others, size):
                phi[i] += weight * (payoff[tuple(sorted((*s, i)))] - payoff[s])
    return phi


def smooth_model(coef: np.ndarray, logit: bool) -> Callable[[np.ndarray], np.ndarray]:
    """A nonlinear model with interactions, on a plain float array; (rows, outputs)."""

    def f(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        z = x @ coef + 0.4 * np.sin(x[:, :1] * x[:, 1:2]) + 0.2 * x[:, -1:] ** 2
        if not logit:
            return z
        if z.shape[1] == 1:
            return np.clip(1 / (1 + np.exp(-z)), EPS, 1 - EPS)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return np.clip(e / e.sum(axis=1, keepdims=True), EPS, 1 - EPS)

    return f


def on_frame(f: Callable[[np.ndarray], np.ndarray]) -> Callable[[pd.DataFrame], np.ndarray]:
    return lambda frame: f(frame.to_numpy(dtype=float))


@pytest.fixture(scope="module")
def numeric() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    return pd.DataFrame(rng.normal(size=(30, 8)), columns=[f"f{i}" for i in range(8)])


@pytest.fixture(scope="module")
def penguin_pipeline() -> tuple[pd.DataFrame, object]:
    """Real data with text, numbers and missing values, and the demo's mixed-type Pipeline."""
    from palmerpenguins import load_penguins

    from shapline.flows.demo import train_penguin_model

    data = load_penguins()
    return data.drop(columns=["species"]), train_penguin_model(data)


def penguin_functions(features: pd.DataFrame, model: object) -> tuple[Callable, Callable]:
    """shap's f (object array in, as in a notebook) and the engine's predict (frame in), class 1 clipped."""
    columns, dtypes = list(features.columns), features.dtypes.to_dict()

    def f_array(x: np.ndarray) -> np.ndarray:
        frame = pd.DataFrame(x, columns=columns).astype(dtypes)
        return np.clip(model.predict_proba(frame)[:, 1], EPS, 1 - EPS)

    def f_frame(frame: pd.DataFrame) -> np.ndarray:
        return np.clip(model.predict_proba(frame)[:, 1:2], EPS, 1 - EPS)

    return f_array, f_frame


@pytest.mark.parametrize("link", ["identity", "logit"])
@pytest.mark.parametrize("l1_reg", ["aic", "bic", "num_features(3)", False])
def test_matches_shap_on_numeric_features(numeric: pd.DataFrame, l1_reg: str | bool, link: str) -> None:
    f = smooth_model(np.linspace(-1, 1, 8).reshape(8, 1), logit=link == "logit")
    background, rows, seeds = numeric.iloc[:10], numeric.iloc[20:23], [11, 12, 13]
    engine = KernelEngine(on_frame(f), background, link=link)
    values, fx = engine.explain(rows, seeds, nsamples=120, l1_reg=l1_reg)
    expected = plain_shap(f, background, rows, seeds, 120, l1_reg, link)
    np.testing.assert_allclose(values, expected, rtol=0, atol=ATOL)
    np.testing.assert_allclose(fx, f(rows.to_numpy()), rtol=0, atol=1e-12)
    explainer = shap.KernelExplainer(f, background.to_numpy(), link=link)
    np.testing.assert_allclose(
        engine.expected_value, np.atleast_1d(explainer.expected_value), rtol=0, atol=1e-12
    )


def test_matches_shap_with_several_outputs_and_weighted_background(numeric: pd.DataFrame) -> None:
    """A 3-class softmax, each output solved on its own; k-means-like weights on the background."""
    f = smooth_model(np.random.default_rng(0).normal(size=(8, 3)), logit=True)
    background, rows, seeds = numeric.iloc[:6], numeric.iloc[24:26], [5, 6]
    weights = np.array([5.0, 1.0, 2.0, 7.0, 1.0, 3.0])
    engine = KernelEngine(on_frame(f), background, weights=weights, link="logit")
    values, _ = engine.explain(rows, seeds, nsamples="auto", l1_reg="aic")
    assert values.shape == (2, 8, 3)
    np.testing.assert_allclose(
        values, plain_shap(f, background, rows, seeds, "auto", "aic", "logit", weights), atol=ATOL
    )
    # Values add up to f(x) - E[f] in link space, per output.
    logit = np.log(f(rows.to_numpy()) / (1 - f(rows.to_numpy())))
    np.testing.assert_allclose(values.sum(axis=1), logit - engine.expected_value, atol=1e-9)


def test_non_varying_features_and_the_one_and_zero_feature_cases(numeric: pd.DataFrame) -> None:
    f = smooth_model(np.linspace(1, 2, 8).reshape(8, 1), logit=False)
    background = numeric.iloc[:8].copy()
    x = numeric.iloc[[20]].copy()
    background["f3"] = x["f3"].iloc[0]  # constant across the background and equal to x: never varies
    background["f5"] = x["f5"].iloc[0] * (1 + 1e-9)  # equal within np.allclose, as shap tests it
    one = background.iloc[[0]].copy()
    one["f2"] = 9.0  # M == 1: only f2 differs from the (single-row) background
    cases = [(background, x), (background.iloc[[0]], one), (background.iloc[[0]], background.iloc[[0]])]
    results = []
    for bg, rows in cases:
        engine = KernelEngine(on_frame(f), bg)
        values, _ = engine.explain(rows, [1], nsamples=100, l1_reg="aic")
        np.testing.assert_allclose(values, plain_shap(f, bg, rows, [1], 100, "aic", "identity"), atol=ATOL)
        results.append(values[0, :, 0])
    assert list(row_plan(KernelEngine(on_frame(f), background), x, 1, 100).varying) == [0, 1, 2, 4, 6, 7]
    assert results[0][3] == results[0][5] == 0.0
    assert np.flatnonzero(results[1]).tolist() == [2]  # the one varying feature takes all the effect
    assert not results[2].any()


@pytest.mark.parametrize(
    ("features", "nsamples", "l1_reg"),
    [
        (8, "auto", "aic"),  # auto (2M + 2048) capped at 2**M - 2: every coalition enumerated
        (8, 253, False),  # the random draws (4 per missing coalition) run out: the last rows stay empty
        (10, 300, "auto"),  # deprecated auto: no selection, as 300 / 1022 >= 20%
        (12, 200, "auto"),  # deprecated auto: AIC below 20%
        (40, 150, "aic"),  # M > 30: no cap, 2**30 possible coalitions
        (70, 60, "num_features(5)"),  # M > 63: coalition keys beyond one machine word
        (9, 120, 0.002),  # a float: scikit-learn's Lasso with that alpha, as shap
    ],
)
def test_matches_shap_on_sampling_edge_cases(
    features: int, nsamples: int | str, l1_reg: str | float | bool
) -> None:
    rng = np.random.default_rng(features)
    frame = pd.DataFrame(rng.normal(size=(8, features)), columns=[f"f{i}" for i in range(features)])
    f = smooth_model(rng.normal(size=(features, 1)), logit=False)
    background, rows, seeds = frame.iloc[:4], frame.iloc[6:8], [1, 2]
    engine = KernelEngine(on_frame(f), background)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        values, _ = engine.explain(rows, seeds, nsamples=nsamples, l1_reg=l1_reg)
    expected = plain_shap(f, background, rows, seeds, nsamples, l1_reg, "identity")
    np.testing.assert_allclose(values, expected, atol=ATOL)
    if nsamples == 253:
        assert [row_plan(engine, rows.iloc[[i]], seeds[i], nsamples).filled for i in (0, 1)] == [
            252,
            251,
        ]


@pytest.mark.parametrize("link", ["identity", "logit"])
def test_every_coalition_gives_the_exact_shapley_values(numeric: pd.DataFrame, link: str) -> None:
    """nsamples >= 2**M - 2 enumerates every coalition: Kernel SHAP is then exactly Shapley's formula."""
    columns = ["f0", "f1", "f2", "f3", "f4"]
    f = smooth_model(np.array([[0.5], [-1.0], [0.8], [0.3], [-0.4]]), logit=link == "logit")
    background, x = numeric[columns].iloc[:7], numeric[columns].iloc[[25]]
    weights = np.arange(1.0, 8.0)
    engine = KernelEngine(on_frame(f), background, weights=weights, link=link)
    values, _ = engine.explain(x, [0], nsamples=2**5, l1_reg=False)
    to_link = (lambda p: np.log(p / (1 - p))) if link == "logit" else (lambda p: p)

    def value(coalition: tuple[int, ...]) -> float:
        hybrid = background.to_numpy().copy()
        hybrid[:, list(coalition)] = x.to_numpy()[0, list(coalition)]
        return float(to_link(np.dot(weights / weights.sum(), f(hybrid)[:, 0])))

    np.testing.assert_allclose(values[0, :, 0], exact_shapley(value, 5), atol=1e-9)


def test_matches_shap_on_mixed_types_with_missing_values(
    penguin_pipeline: tuple[pd.DataFrame, object],
) -> None:
    features, model = penguin_pipeline
    f_array, f_frame = penguin_functions(features, model)
    seen: list[tuple[pd.Series, bool]] = []

    def predict(frame: pd.DataFrame) -> np.ndarray:
        seen.append((frame.dtypes.copy(), bool(frame["sex"].isna().any())))
        return f_frame(frame)

    background = shap.sample(features, 20, random_state=0)
    rows = features.iloc[[3, 9, 150]]  # row 3 is all missing but island and year
    engine = KernelEngine(predict, background, link="logit")
    values, _ = engine.explain(rows, [1, 2, 3], nsamples="auto", l1_reg="aic")
    np.testing.assert_allclose(
        values, plain_shap(f_array, background, rows, [1, 2, 3], "auto", "aic", "logit"), atol=ATOL
    )
    assert all(dtypes.equals(features.dtypes) for dtypes, _ in seen)  # text stays text, numbers numbers
    assert any(missing for _, missing in seen)  # and missing values stay missing


def test_batched_rows_equal_one_row_per_call(
    numeric: pd.DataFrame, penguin_pipeline: tuple[pd.DataFrame, object]
) -> None:
    f = smooth_model(np.linspace(-1, 1, 8).reshape(8, 1), logit=True)
    calls: list[int] = []

    def predict(frame: pd.DataFrame) -> np.ndarray:
        calls.append(len(frame))
        return on_frame(f)(frame)

    engine = KernelEngine(predict, numeric.iloc[:10], link="logit")
    rows, seeds = numeric.iloc[10:17], list(range(7))
    calls.clear()
    one, fx_one = engine.explain(rows, seeds, nsamples=150, l1_reg="aic")
    assert len(calls) == 7  # f(x) rides in the same call as the synthetic rows
    calls.clear()
    three, fx_three = engine.explain(rows, seeds, nsamples=150, l1_reg="aic", batch_rows=3)
    assert len(calls) == 3
    np.testing.assert_allclose(three, one, atol=1e-12)
    np.testing.assert_allclose(fx_three, fx_one, atol=1e-12)

    features, model = penguin_pipeline
    engine = KernelEngine(penguin_functions(features, model)[1], shap.sample(features, 10, random_state=1))
    rows = features.iloc[[0, 3, 100, 200, 300]]
    one, _ = engine.explain(rows, [0, 1, 2, 3, 4], l1_reg="aic")
    four, _ = engine.explain(rows, [0, 1, 2, 3, 4], l1_reg="aic", batch_rows=4)
    np.testing.assert_allclose(four, one, atol=1e-12)


def test_dedupe_sends_each_distinct_row_once_with_identical_results(
    penguin_pipeline: tuple[pd.DataFrame, object],
) -> None:
    features, model = penguin_pipeline
    f_frame = penguin_functions(features, model)[1]
    sent: list[pd.DataFrame] = []

    def predict(frame: pd.DataFrame) -> np.ndarray:
        sent.append(frame.copy())
        return f_frame(frame)

    engine = KernelEngine(predict, shap.sample(features, 15, random_state=2), link="logit")
    rows, seeds = features.iloc[[3, 8, 40, 41]], [7, 8, 9, 10]
    plain, fx_plain = engine.explain(rows, seeds, l1_reg="aic", batch_rows=2)
    total = engine.rows_sent
    assert engine.rows_saved == 0
    sent.clear()
    deduped, fx_deduped = engine.explain(rows, seeds, l1_reg="aic", batch_rows=2, dedupe=True)
    # Equal up to the model's own rounding: a smaller call can move a BLAS product's last bit.
    np.testing.assert_allclose(deduped, plain, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fx_deduped, fx_plain, rtol=0, atol=1e-12)
    assert engine.rows_saved > 0 and engine.rows_sent - total + engine.rows_saved == total
    assert all(not frame.duplicated().any() for frame in sent)  # duplicated() counts NaN equal to NaN


def test_a_deduplicated_call_writes_its_distinct_rows_as_the_whole_call_holds_them(
    penguin_pipeline: tuple[pd.DataFrame, object],
) -> None:
    """Only the distinct rows are written: each column (float, text, the object column pandas makes of
    mixed values) holds exactly the values and dtype the whole call's frame holds at those rows."""
    features, _ = penguin_pipeline
    mixed = features.assign(
        note=np.array(["a", 1, None, 2.5] * (len(features) // 4 + 1), dtype=object)[: len(features)]
    )
    engine = KernelEngine(lambda frame: np.zeros((len(frame), 1)), shap.sample(mixed, 12, random_state=3))
    data = engine._prepare(engine._as_rows(mixed.iloc[[3, 8, 40]]))
    plans = [engine._plan(data, i, 5 + i, 300) for i in range(3)]
    batch = engine._batch(plans, data, np.arange(3))
    groups = engine._distinct_rows(batch)
    assert groups is not None
    first, _ = groups
    whole = engine._assemble(*engine._fill(batch, _Buffers())).iloc[first].reset_index(drop=True)
    distinct = engine._assemble(*engine._fill(batch, _Buffers(), first))
    assert distinct.dtypes.to_dict() == whole.dtypes.to_dict()
    pd.testing.assert_frame_equal(distinct, whole)
    assert len(first) < batch.n_rows


def test_dedupe_on_numeric_rows_equals_no_dedupe(numeric: pd.DataFrame) -> None:
    """Bit for bit, for a model whose output for a row does not depend on the other rows of the call
    (a BLAS product can differ in the last bit with the batch, and a deduplicated call is smaller)."""
    coef = np.linspace(-1, 1, 8)

    def f(frame: pd.DataFrame) -> np.ndarray:
        x = frame.to_numpy(dtype=float)
        z = np.zeros(len(x))
        for j in range(x.shape[1]):  # element-wise only: the same bits whatever the batch
            z = z + coef[j] * x[:, j] + 0.3 * np.sin(x[:, j] * x[:, -1])
        return z

    background = numeric.iloc[:10].round(0)  # repeated values make repeated synthetic rows
    rows = numeric.iloc[12:15].round(0)
    engine = KernelEngine(f, background)
    for batch_rows in (1, 3):
        plain, _ = engine.explain(rows, [1, 2, 3], nsamples=200, l1_reg="bic", batch_rows=batch_rows)
        deduped, _ = engine.explain(
            rows, [1, 2, 3], nsamples=200, l1_reg="bic", batch_rows=batch_rows, dedupe=True
        )
        assert np.array_equal(plain, deduped)
    assert engine.rows_saved > 0


def test_dedupe_merges_only_rows_a_model_cannot_tell_apart() -> None:
    """-0.0 is == 0.0, True == 1 == 1.0 and pandas takes None for NaN; a model may not (here it does
    not), so deduplicating must not give one's output to the other."""
    background = pd.DataFrame(
        {
            "zero": [0.0, -0.0, 0.0, -0.0, np.nan, 1.0],
            "flag": np.array([True, 1, 1.0, None, np.nan, True], dtype=object),
            "n": [1.0, 2.0, 1.0, 2.0, 1.0, 2.0],
        }
    )

    def f(frame: pd.DataFrame) -> np.ndarray:
        zero = np.copysign(1.0, frame["zero"].to_numpy(dtype=float))
        kind = {bool: 1.0, int: 2.0, float: 3.0, type(None): 4.0}
        flag = np.array([kind[type(v)] + (v != v) for v in frame["flag"]])
        return (zero * 0.7 + flag * 0.3 + frame["n"].to_numpy(dtype=float) * 0.1)[:, None]

    rows = background.iloc[[0, 1, 3]].copy()
    rows["n"] = [3.0, 4.0, 5.0]
    engine = KernelEngine(f, background)
    plain, fx_plain = engine.explain(rows, [1, 2, 3], l1_reg=False)
    deduped, fx_deduped = engine.explain(rows, [1, 2, 3], l1_reg=False, dedupe=True)
    assert engine.rows_saved > 0  # rows do repeat: the ones whose values are the same objects
    assert np.array_equal(deduped, plain) and np.array_equal(fx_deduped, fx_plain)


def test_repeat_share_is_the_rows_own_share_of_repeats_when_the_sample_is_the_whole_row(
    penguin_pipeline: tuple[pd.DataFrame, object],
) -> None:
    features, model = penguin_pipeline
    engine = KernelEngine(penguin_functions(features, model)[1], shap.sample(features, 15, random_state=2))
    data = engine._prepare(engine._as_rows(features.iloc[[3]]))
    plan = engine._plan(data, 0, 7, "auto")
    assert 0 < plan.filled <= 128  # 7 features: every coalition is in the sample
    synthetic = synthetic_rows(engine, features.iloc[[3]], 7)
    counted = synthetic.duplicated().mean()  # NaN equal to NaN, as the engine counts
    assert counted > 0.2
    assert engine._repeat_share(engine._batch([plan], data, np.arange(1))) == pytest.approx(
        counted, abs=1e-12
    )


def test_auto_dedupe_where_rows_repeat_and_not_where_they_do_not(
    penguin_pipeline: tuple[pd.DataFrame, object], numeric: pd.DataFrame
) -> None:
    """One decision per engine, from its first call; the values are the same either way."""
    features, model = penguin_pipeline
    rows, seeds = features.iloc[[3, 8, 40, 41]], [7, 8, 9, 10]
    engine = KernelEngine(penguin_functions(features, model)[1], shap.sample(features, 15, random_state=2))
    plain, _ = engine.explain(rows, seeds, l1_reg="aic")
    auto = KernelEngine(penguin_functions(features, model)[1], shap.sample(features, 15, random_state=2))
    values, _ = auto.explain(rows, seeds, l1_reg="aic", dedupe="auto")
    np.testing.assert_allclose(values, plain, rtol=0, atol=1e-12)
    assert auto.rows_saved > 0.2 * (auto.rows_sent + auto.rows_saved)

    f = smooth_model(np.linspace(-1, 1, 8).reshape(8, 1), logit=False)
    continuous = KernelEngine(on_frame(f), numeric.iloc[:10])
    continuous.explain(numeric.iloc[10:14], [1, 2, 3, 4], nsamples=200, l1_reg="aic", dedupe="auto")
    assert continuous.rows_saved == 0 and continuous._auto_dedupe is False

    with pytest.raises(ValueError, match="dedupe must be true, false or 'auto', got 'yes'"):
        engine.explain(rows, seeds, dedupe="yes")


def test_concurrent_threads_give_the_sequential_values(numeric: pd.DataFrame) -> None:
    f = smooth_model(np.linspace(-1, 1, 8).reshape(8, 1), logit=True)
    engine = KernelEngine(on_frame(f), numeric.iloc[:10], link="logit")
    parts = [(numeric.iloc[10:16], list(range(6))), (numeric.iloc[16:22], list(range(6, 12)))]
    sequential = [engine.explain(rows, seeds, nsamples=200, l1_reg="aic")[0] for rows, seeds in parts]
    results: dict[int, np.ndarray] = {}
    start = threading.Barrier(2)

    def work(i: int) -> None:
        start.wait()
        for _ in range(3):
            results[i] = engine.explain(*parts[i], nsamples=200, l1_reg="aic")[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(2):
        assert np.array_equal(results[i], sequential[i])


@pytest.mark.parametrize("populated", [False, True])
def test_frames_kept_by_predict_are_never_overwritten(
    numeric: pd.DataFrame, populated: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine reuses a call's memory for the next call only when nothing else still refers to it, in
    numpy's memory or in a mapping with its pages in place (what a large call gets: every buffer here)."""
    if populated:
        monkeypatch.setattr(_Buffers, "POPULATED_BYTES", 0)
    _Buffers.of_this_thread()._buffers.clear()  # what earlier tests left in this thread
    f = smooth_model(np.linspace(-1, 1, 8).reshape(8, 1), logit=False)
    kept: list[tuple[pd.DataFrame, pd.DataFrame]] = []

    def predict(frame: pd.DataFrame) -> np.ndarray:
        kept.append((frame, frame.copy()))
        return on_frame(f)(frame)

    engine = KernelEngine(predict, numeric.iloc[:5])
    engine.explain(numeric.iloc[10:16], list(range(6)), nsamples=60, batch_rows=2)
    assert len(kept) == 4 and all(frame.equals(copy) for frame, copy in kept)
    buffers = _Buffers.of_this_thread()._buffers.values()
    assert all(isinstance(mapping_of(b), mmap.mmap) == populated for b in buffers)


def mapping_of(array: np.ndarray) -> object:
    """What holds an array's memory: numpy's own allocation (None) or an object it borrows from."""
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


def test_a_large_buffer_is_mapped_with_its_pages_and_freed_with_its_last_view() -> None:
    buffers = _Buffers()
    large = buffers.get("rows", np.dtype(np.float32), (1000, 300))  # 1.2 MB
    assert isinstance(mapping_of(large), mmap.mmap) and large.flags.writeable
    large[:] = 1.5
    again = buffers.get("rows", np.dtype(np.float32), (1000, 300))
    assert not np.shares_memory(again, large)  # `large` still refers to the first
    assert mapping_of(buffers.get("index", np.dtype(np.intp), (1, 100))) is None  # small: numpy's memory
    mapping = weakref.ref(mapping_of(large))
    buffers._buffers.clear()
    assert mapping() is not None  # `large` keeps it
    del large
    assert mapping() is None  # unmapped with its last view


def test_a_threads_buffers_carry_nothing_from_one_engine_to_the_next(
    numeric: pd.DataFrame, penguin_pipeline: tuple[pd.DataFrame, object]
) -> None:
    """Buffers outlive an `explain` call in their thread (a shard's first row skips fresh memory): other
    engines, other widths and mixed dtypes in between must leave every value as a fresh thread computes."""
    f = smooth_model(np.linspace(-1, 1, 8).reshape(8, 1), logit=True)
    wide = KernelEngine(on_frame(f), numeric.iloc[:10], link="logit")
    narrow = KernelEngine(on_frame(lambda x: f(np.hstack([x, x[:, :4]]))), numeric.iloc[:6, :4], link="logit")
    frame, model = penguin_pipeline
    mixed = KernelEngine(lambda rows: model.predict_proba(rows), frame.iloc[:8])  # type: ignore[attr-defined]

    def run() -> list[np.ndarray]:
        return [
            wide.explain(numeric.iloc[10:14], [1, 2, 3, 4], nsamples=150, l1_reg="aic")[0],
            narrow.explain(numeric.iloc[20:23, :4], [5, 6, 7], nsamples=12, l1_reg=False)[0],
            mixed.explain(frame.iloc[30:33], [8, 9, 10], nsamples=40, l1_reg=False)[0],
            wide.explain(numeric.iloc[10:14], [1, 2, 3, 4], nsamples=150, l1_reg="aic", batch_rows=3)[0],
        ]

    fresh: list[list[np.ndarray]] = []
    thread = threading.Thread(target=lambda: fresh.append(run()))
    thread.start()
    thread.join()
    for _ in range(2):  # this thread: its buffers now hold every earlier call's rows
        for got, expected in zip(run(), fresh[0], strict=True):
            assert np.array_equal(got, expected)


def test_matches_shap_on_the_breast_cancer_benchmark() -> None:
    """The benchmark workload itself: XGBoost, 50 background rows, nsamples auto, AIC, logit."""
    xgboost = pytest.importorskip("xgboost")
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    model = xgboost.XGBClassifier(n_estimators=30, max_depth=4, n_jobs=1, random_state=0)
    model.fit(bunch.data, bunch.target)

    def f(x: np.ndarray | pd.DataFrame) -> np.ndarray:
        return np.clip(model.predict_proba(x)[:, 1:2], EPS, 1 - EPS)

    background = shap.sample(bunch.data, 50, random_state=0)
    rows, seeds = (
        bunch.data.iloc[[0, 300]],
        [int(np.random.SeedSequence([0, i]).generate_state(1)[0]) for i in (0, 300)],
    )
    values, fx = KernelEngine(f, background, link="logit").explain(rows, seeds, nsamples="auto", l1_reg="aic")
    np.testing.assert_allclose(
        values, plain_shap(f, background, rows, seeds, "auto", "aic", "logit"), atol=ATOL
    )
    np.testing.assert_array_equal(fx, f(rows))


def test_float32_rows_for_a_model_that_reads_float32_change_no_bit() -> None:
    """XGBoost casts every number to float32 (round to nearest, as numpy): building the synthetic rows in
    float32 gives the same values and f(x), bit for bit, on numbers float32 cannot hold exactly, NaN and
    an integer column (which keeps its dtype)."""
    xgboost = pytest.importorskip("xgboost")
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    data = bunch.data.iloc[:, :6].copy() * (1 + 1e-9)  # far from float32's grid
    data.iloc[::7, 2] = np.nan
    data["count"] = np.arange(len(data)) % 5
    model = xgboost.XGBClassifier(n_estimators=20, max_depth=3, n_jobs=1, random_state=0)
    model.fit(data, bunch.target)
    seen: list[dict[str, np.dtype]] = []

    def f(frame: pd.DataFrame) -> np.ndarray:
        seen.append(frame.dtypes.to_dict())
        return np.clip(model.predict_proba(frame.to_numpy())[:, 1:2], EPS, 1 - EPS)

    background, rows = data.iloc[:20], data.iloc[[40, 41, 42]]
    seeds = [5, 6, 7]
    reference = KernelEngine(f, background, link="logit").explain(rows, seeds, nsamples=200, l1_reg="aic")
    seen.clear()
    values = KernelEngine(f, background, link="logit", float32=True).explain(
        rows, seeds, nsamples=200, l1_reg="aic"
    )
    np.testing.assert_array_equal(values[0], reference[0])
    np.testing.assert_array_equal(values[1], reference[1])
    assert seen[-1]["mean radius"] == np.float32 and seen[-1]["count"] == data["count"].dtype


@pytest.mark.parametrize("batch_rows", [1, 3])
@pytest.mark.parametrize("dedupe", [False, True])
def test_row_major_rows_for_a_model_that_reads_rows_change_no_bit(
    numeric: pd.DataFrame, batch_rows: int, dedupe: bool
) -> None:
    """A model that reads rows (XGBoost) is handed each call as one row-major array, in the engine's own
    memory (no copy on the way to the model): the values and f(x) are the column-major engine's, bit for
    bit, merged or not, deduplicated or not. A frame of two dtypes keeps its columns (several arrays)."""
    data = numeric.copy()
    data.iloc[::4, 1] = np.nan
    data.iloc[:, 2] = data.iloc[:, 2].round(0)  # repeats for dedupe to find
    layouts: list[tuple[bool, bool]] = []

    def f(frame: pd.DataFrame) -> np.ndarray:
        array = frame.to_numpy()
        layouts.append((array.flags.c_contiguous, np.shares_memory(array, frame.to_numpy())))
        # Column by column, in one order whatever the layout (a BLAS product's sums depend on it).
        out = np.zeros(len(array))
        for j, weight in enumerate(np.linspace(-1, 1, array.shape[1])):
            out += np.nan_to_num(array[:, j].astype(float), nan=0.3) * weight
        return out[:, None]

    background, rows, seeds = data.iloc[:12], data.iloc[12:19], list(range(7))
    settings = {"nsamples": 100, "l1_reg": "aic", "batch_rows": batch_rows, "dedupe": dedupe}
    by_column = KernelEngine(f, background).explain(rows, seeds, **settings)
    assert not layouts[-1][0]
    layouts.clear()
    engine = KernelEngine(f, background, row_major=True)
    by_row = engine.explain(rows, seeds, **settings)
    assert layouts and all(c_order and shared for c_order, shared in layouts[1:])  # [0]: the background's
    np.testing.assert_array_equal(by_row[0], by_column[0])
    np.testing.assert_array_equal(by_row[1], by_column[1])
    if dedupe:
        assert engine.rows_saved > 0
    mixed = data.assign(count=np.arange(len(data)) % 3)
    layouts.clear()
    KernelEngine(f, mixed.iloc[:12], row_major=True).explain(mixed.iloc[12:14], seeds[:2], **settings)
    assert not layouts[-1][0]


@pytest.mark.parametrize("m", [2, 3, 17, 30, 64, 200])
def test_shuffles_are_the_ones_shap_draws_in_successive_calls(m: int) -> None:
    for seed in (0, 1, 2**31 + 5):
        shuffled, shuffles = np.random.RandomState(seed), _Shuffles(np.random.RandomState(seed))
        for count in (40, 1, 7, 300):  # each call goes on where the last one stopped in the stream
            expected = np.tile(np.arange(m), (count, 1))
            for row in expected:
                shuffled.shuffle(row)
            swaps = shuffles.swaps(m, count)
            permutations = np.tile(np.arange(m), (count, 1))
            for permutation, steps in zip(permutations, swaps, strict=True):
                for step, j in enumerate(steps):
                    i = m - 1 - step
                    permutation[[i, j]] = permutation[[j, i]]
            np.testing.assert_array_equal(permutations, expected)
            sizes = np.arange(count) % (m + 1)
            leading = np.zeros((count, m), dtype=bool)
            for d in range(count):
                leading[d, expected[d, : sizes[d]]] = True
            np.testing.assert_array_equal(compiled.leading_sets(swaps, sizes), leading)
    assert _Shuffles(np.random.RandomState(0)).swaps(5, 0).shape == (0, 4)


def test_rejects_mismatched_inputs(numeric: pd.DataFrame) -> None:
    engine = KernelEngine(on_frame(smooth_model(np.ones((8, 1)), False)), numeric.iloc[:5])
    with pytest.raises(ValueError, match="seeds"):
        engine.explain(numeric.iloc[:3], [1])
    with pytest.raises(ValueError, match="lack"):
        engine.explain(numeric.iloc[:2, :4], [1, 2])
    with pytest.raises(ValueError, match="link"):
        KernelEngine(on_frame(smooth_model(np.ones((8, 1)), False)), numeric.iloc[:5], link="probit")


class ModelClock:
    """The engine's clock, in a world where only model calls take time: `per_call` seconds a call whatever
    its rows, and `per_row` a row. Wraps a predict function and counts its calls' rows."""

    def __init__(self, per_call: float, per_row: float) -> None:
        self.per_call, self.per_row, self.now = per_call, per_row, 0.0
        self.calls: list[int] = []

    def __call__(self) -> float:
        return self.now

    def timed(self, predict: Callable[[pd.DataFrame], np.ndarray]) -> Callable[[pd.DataFrame], np.ndarray]:
        def call(frame: pd.DataFrame) -> np.ndarray:
            self.now += self.per_call + self.per_row * len(frame)
            self.calls.append(len(frame))
            return predict(frame)

        return call


def pipeline_on_clock(
    penguin_pipeline: tuple[pd.DataFrame, object], monkeypatch: pytest.MonkeyPatch
) -> tuple[ModelClock, pd.DataFrame, pd.DataFrame, list[int], Callable[[pd.DataFrame], np.ndarray]]:
    """The demo's Pipeline on the engine's clock at ~4 ms a call and 0.6 us a row, as it costs: its clock, a
    10-row background, six rows to explain, their seeds and the timed predict."""
    from shapline.tasks.explainers import kernel_engine

    features, model = penguin_pipeline
    clock = ModelClock(per_call=4e-3, per_row=6e-7)
    monkeypatch.setattr(kernel_engine, "_clock", clock)
    background, rows, seeds = shap.sample(features, 10, random_state=1), features.iloc[:6], list(range(6))
    return clock, background, rows, seeds, clock.timed(penguin_functions(features, model)[1])


def test_auto_merges_the_calls_of_a_model_that_costs_per_call(
    penguin_pipeline: tuple[pd.DataFrame, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Pipeline pays ~4 ms a call whatever its rows: batch_rows auto tells that from the background's call
    and the first row's, then merges the other rows' calls; the values stay those of one row per call."""
    from shapline.tasks.explainers import kernel_engine

    clock, background, rows, seeds, predict = pipeline_on_clock(penguin_pipeline, monkeypatch)
    monkeypatch.setattr(kernel_engine, "_FIRST_CALL_BYTES", 1)  # the first call one row (see below)
    one, fx_one = KernelEngine(predict, background, link="logit").explain(rows, seeds, l1_reg="aic")
    clock.calls.clear()
    engine = KernelEngine(predict, background, link="logit")
    merged, fx_merged = engine.explain(rows, seeds, l1_reg="aic", batch_rows="auto")
    assert clock.calls == [10, 1261, 5 * 1261]  # the background, the first row (timed), the other five
    assert engine.call_cost is not None
    assert engine.call_cost.per_call == pytest.approx(4e-3) and engine.call_cost.per_row == pytest.approx(
        6e-7
    )
    np.testing.assert_allclose(merged, one, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fx_merged, fx_one, rtol=0, atol=1e-12)
    # A later engine of the process knows the cost: it merges from its first call.
    clock.calls.clear()
    later = KernelEngine(predict, background, link="logit", call_cost=engine.call_cost)
    again, _ = later.explain(rows, seeds, l1_reg="aic", batch_rows="auto")
    assert clock.calls == [10, 6 * 1261]
    np.testing.assert_allclose(again, one, rtol=0, atol=1e-12)


def test_auto_times_the_model_alone_not_a_first_write_of_the_rows(
    penguin_pipeline: tuple[pd.DataFrame, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first call's rows are written before it (a process's first write can pay first-time costs: loading
    machine code, fresh memory): only the model's call is timed, so a slow write does not read as a cost
    per row and leave a Pipeline at one row a call."""
    from shapline.tasks.explainers import kernel_engine

    clock, background, rows, seeds, predict = pipeline_on_clock(penguin_pipeline, monkeypatch)
    fill = compiled.fill_synthetic

    def slow_first_fill(*args: object) -> None:
        clock.now += 0.5  # once: what loading the fill's machine code cost a first shard
        monkeypatch.setattr(compiled, "fill_synthetic", fill)
        fill(*args)

    monkeypatch.setattr(compiled, "fill_synthetic", slow_first_fill)
    monkeypatch.setattr(kernel_engine, "_FIRST_CALL_BYTES", 1)
    engine = KernelEngine(predict, background, link="logit")
    engine.explain(rows, seeds, l1_reg="aic", batch_rows="auto")
    assert clock.calls == [10, 1261, 5 * 1261]
    assert engine.call_cost is not None and engine.call_cost.per_call == pytest.approx(4e-3)


def test_auto_keeps_one_row_a_call_for_a_model_that_costs_per_row(
    numeric: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fast XGBoost: 0.1 ms a call, 40 ms a row's call. Merging would only hold more memory."""
    from shapline.tasks.explainers import kernel_engine

    clock = ModelClock(per_call=1e-4, per_row=4e-7)
    monkeypatch.setattr(kernel_engine, "_clock", clock)
    monkeypatch.setattr(kernel_engine, "_FIRST_CALL_BYTES", 1)  # a first call of one row, as breast cancer's
    predict = clock.timed(on_frame(smooth_model(np.linspace(-1, 1, 8).reshape(8, 1), logit=True)))
    engine = KernelEngine(predict, numeric.iloc[:25], link="logit")
    engine.explain(numeric.iloc[25:30], list(range(5)), l1_reg="aic", batch_rows="auto")
    assert clock.calls == [25] + [254 * 25 + 1] * 5  # every coalition of 8 features, one row a call


def test_auto_merges_a_first_call_of_small_rows_and_decides_from_it(
    penguin_pipeline: tuple[pd.DataFrame, object], numeric: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls hold at least as many explained rows as fit _FIRST_CALL_BYTES of synthetic rows, the first
    one too, before the cost is known: a Pipeline's first shard makes one call fewer. The cost is told from
    that call per row, not per merged call, so a model that costs per row is merged no further than the
    budget; the values are one row a call's."""
    from shapline.tasks.explainers import kernel_engine

    clock, background, rows, seeds, predict = pipeline_on_clock(penguin_pipeline, monkeypatch)
    one, _ = KernelEngine(predict, background, link="logit").explain(rows, seeds, l1_reg="aic")
    clock.calls.clear()
    engine = KernelEngine(predict, background, link="logit")
    merged, _ = engine.explain(rows, seeds, l1_reg="aic", batch_rows="auto")
    assert clock.calls == [10, 6 * 1261]  # the background; every row in the first call, timed
    assert engine.call_cost is not None
    assert engine.call_cost.per_call == pytest.approx(4e-3)
    assert engine.call_cost.per_row == pytest.approx(6e-7)
    np.testing.assert_allclose(merged, one, rtol=0, atol=1e-12)

    # A model that costs per row, its calls merged by the budget alone (three rows of 8 float64 features,
    # 6,097 synthetic rows each, fit it): three rows a call from the first, no more.
    monkeypatch.setattr(kernel_engine, "_FIRST_CALL_BYTES", 3 * 6097 * 8 * 8)
    clock = ModelClock(per_call=1e-4, per_row=4e-7)
    monkeypatch.setattr(kernel_engine, "_clock", clock)
    predict = clock.timed(on_frame(smooth_model(np.linspace(-1, 1, 8).reshape(8, 1), logit=True)))
    engine = KernelEngine(predict, numeric.iloc[:24], link="logit")
    engine.explain(numeric.iloc[24:30], list(range(6)), l1_reg="aic", batch_rows="auto")
    assert clock.calls == [24, 3 * (254 * 24 + 1), 3 * (254 * 24 + 1)]
    assert engine.call_cost is not None and engine.call_cost.per_call == pytest.approx(1e-4)


def test_rows_to_merge_stops_at_the_memory_a_thread_keeps() -> None:
    from shapline.tasks.explainers.kernel_engine import _FIXED_SHARE, _rows_to_merge
    from shapline.tasks.models.predictors import CallCost

    assert _rows_to_merge(CallCost(per_call=0.0, per_row=1e-6), 10_000, 8) == 1
    cost = CallCost(per_call=1e-3, per_row=1e-6)  # the fixed cost is 10% of a 10,000-row call
    assert _rows_to_merge(cost, 10_000, 8) == math.ceil(1e-3 / (_FIXED_SHARE * 1e-2))
    assert _rows_to_merge(CallCost(per_call=1.0, per_row=0.0), 10_000, 8) == _Buffers.KEPT_BYTES // 80_000
    assert _rows_to_merge(CallCost(per_call=1.0, per_row=1e-9), 10**8, 8) == 1  # one row's call is that big


def shap_coalitions(m: int, nsamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """shap's KernelExplainer.explain sampling, transcribed (its masks and kernel weights), on numpy's global
    RNG seeded as shap is: the reference for the engine's compiled draw."""
    from scipy.special import binom

    np.random.seed(seed)
    num_subset_sizes, num_paired = int(np.ceil((m - 1) / 2.0)), int(np.floor((m - 1) / 2.0))
    weight_vector = np.array([(m - 1.0) / (i * (m - i)) for i in range(1, num_subset_sizes + 1)])
    weight_vector[:num_paired] *= 2
    weight_vector /= np.sum(weight_vector)
    masks, weights = [], []
    num_full, left, remaining = 0, nsamples, weight_vector.copy()
    for size in range(1, num_subset_sizes + 1):
        nsubsets = binom(m, size) * (2 if size <= num_paired else 1)
        if left * remaining[size - 1] / nsubsets < 1.0 - 1e-8:
            break
        num_full += 1
        left -= nsubsets
        if remaining[size - 1] < 1.0:
            remaining /= 1 - remaining[size - 1]
        w = weight_vector[size - 1] / binom(m, size) / (2.0 if size <= num_paired else 1.0)
        for inds in itertools.combinations(range(m), size):
            mask = np.zeros(m)
            mask[list(inds)] = 1.0
            masks.append(mask), weights.append(w)
            if size <= num_paired:
                masks.append(np.abs(mask - 1)), weights.append(w)
    nfixed = len(masks)
    samples_left = nsamples - nfixed
    if num_full != num_subset_sizes:
        vector = weight_vector.copy()
        vector[:num_paired] /= 2
        vector = vector[num_full:] / np.sum(vector[num_full:])
        ind_set = np.random.choice(len(vector), 4 * samples_left, p=vector)
        used: dict[tuple[float, ...], int] = {}
        position = 0
        while samples_left > 0 and position < len(ind_set):
            mask = np.zeros(m)
            size = ind_set[position] + num_full + 1
            position += 1
            mask[np.random.permutation(m)[:size]] = 1.0
            key, new = tuple(mask), False
            if key not in used:
                new, used[key] = True, len(masks)
                samples_left -= 1
                masks.append(mask.copy()), weights.append(1.0)
            else:
                weights[used[key]] += 1.0
            if samples_left > 0 and size <= num_paired:
                if new:
                    samples_left -= 1
                    masks.append(np.abs(mask - 1)), weights.append(1.0)
                else:
                    weights[used[key] + 1] += 1.0
        weights_array = np.array(weights)
        weights_array[nfixed:] *= np.sum(weight_vector[num_full:]) / weights_array[nfixed:].sum()
        return np.array(masks), weights_array
    return np.array(masks), np.array(weights)


@pytest.mark.parametrize("m", [3, 6, 9, 12, 16, 23, 30, 41, 63])
def test_the_compiled_draw_is_shaps_sampling(m: int) -> None:
    """Masks and kernel weights bit for bit those of shap's loop (its RNG calls, its repeats and paired
    complements), for budgets that enumerate, sample, repeat heavily (m = 12) and exhaust the draws."""
    for nsamples in ("auto", 60, 700):
        budget = 2 * m + 2**11 if nsamples == "auto" else nsamples
        if m <= 30:
            budget = min(budget, 2**m - 2)
        for seed in (0, 7, 2**31 + 3):
            masks, weights, filled, _ = _draw_coalitions(m, nsamples, np.random.RandomState(seed))
            expected_masks, expected_weights = shap_coalitions(m, budget, seed)
            assert filled == len(expected_masks)
            np.testing.assert_array_equal(masks[:filled], expected_masks)
            np.testing.assert_array_equal(weights[:filled], expected_weights)


def test_a_threads_reseeded_generator_draws_what_a_fresh_one_draws() -> None:
    """Each row's draw reseeds its thread's RandomState (a new one costs ~0.09 ms of OS entropy): after any
    earlier draws, in this thread or another, a seed gives what np.random.RandomState(seed) gives."""

    def draws(seeds: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        _seeded(9).standard_normal(1)  # left mid-stream, a Gaussian's twin kept: reseeding drops both
        return [_draw_coalitions(30, "auto", _seeded(seed))[:2] for seed in seeds]

    seeds = [5, 0, 2**32 - 1, 5, 123_456]
    expected = [_draw_coalitions(30, "auto", np.random.RandomState(seed))[:2] for seed in seeds]
    with ThreadPoolExecutor(2) as pool:
        others = [pool.submit(draws, seeds), pool.submit(draws, seeds[::-1])]
        results = [draws(seeds), others[0].result(), others[1].result()[::-1]]
    for got in results:
        for (masks, weights), (want_masks, want_weights) in zip(got, expected, strict=True):
            np.testing.assert_array_equal(masks, want_masks)
            np.testing.assert_array_equal(weights, want_weights)


def test_pandas_na_is_a_missing_value_unequal_to_every_value(numeric: pd.DataFrame) -> None:
    """A nullable integer column's missing value is pandas' NA, whose == has no truth value (shap stops on
    it): a feature whose value is NA varies against any background, as a NaN does among mixed types. The
    values equal those of the same column as floats with NaN, for a model that reads both the same."""
    frame = numeric.iloc[:, :4].copy()
    counts = np.arange(len(frame)) % 5
    frame["count"] = pd.array(counts, dtype="Int64")
    frame.loc[frame.index[::3], "count"] = pd.NA
    frame["kind"] = pd.array(np.where(counts > 2, "high", "low"), dtype="str")
    floats = frame.astype({"count": "float64"})

    def model(rows: pd.DataFrame) -> np.ndarray:
        count = rows["count"].to_numpy(dtype=float, na_value=np.nan)
        score = rows.iloc[:, :4].to_numpy(float).sum(axis=1) + np.nan_to_num(count, nan=-1.0)
        return (score + (rows["kind"] == "high").to_numpy(float)).reshape(-1, 1)

    background, rows, seeds = slice(0, 12), slice(12, 20), list(range(8))
    assert frame.iloc[rows]["count"].isna().any() and frame.iloc[background]["count"].isna().any()
    nullable, _ = KernelEngine(model, frame.iloc[background]).explain(frame.iloc[rows], seeds, nsamples=40)
    expected, _ = KernelEngine(model, floats.iloc[background]).explain(floats.iloc[rows], seeds, nsamples=40)
    np.testing.assert_allclose(nullable, expected, rtol=0, atol=1e-12)


def test_warm_up_explains_quietly_and_imports_nothing_a_shard_may_not_need() -> None:
    """The warm-up runs beside a run's loading and validation (and once in a pool's fork server): in a fresh
    process with warnings as errors it explains its small frame without one, and without importing what
    only some shards need (scikit-learn's linear models, shap, plotting)."""
    script = textwrap.dedent(
        """
        import sys
        from shapline.tasks.explainers import kernel_engine

        kernel_engine.warm_up()
        print(sorted(m for m in ("sklearn.linear_model", "shap", "matplotlib") if m in sys.modules))
        """
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_merged_call_the_model_refuses_names_the_row_it_refuses(
    numeric: pd.DataFrame, adaptive: bool
) -> None:
    """Several rows' calls in one: the model refuses the call because of one row's synthetic rows. The error
    names that row, as a call of its own would have (each row's call is made alone until one is refused)."""
    from shapline.tasks.common.errors import ModelError

    model = on_frame(smooth_model(np.linspace(-1, 1, 8).reshape(8, 1), logit=True))
    bad = float(numeric.iloc[27, 0])

    def predict(frame: pd.DataFrame) -> np.ndarray:
        if (frame["f0"] == bad).any():
            raise ModelError("refused a value")
        return model(frame)

    engine = KernelEngine(predict, numeric.iloc[:20], link="logit")
    rows = numeric.iloc[24:30]
    ids = [f"r{i}" for i in range(24, 30)]
    with pytest.raises(ModelError, match=r"^explaining row_id r27: refused a value$"):
        if adaptive:
            engine.explain_adaptive(rows, list(range(6)), 400, 0.01, batch_rows=6, row_ids=ids)
        else:
            engine.explain(rows, list(range(6)), nsamples=60, batch_rows=6, row_ids=ids)

    # A model that refuses only merged calls: the merged call's rows are named.
    def big_calls_refused(frame: pd.DataFrame) -> np.ndarray:
        if len(frame) > 2000:
            raise ModelError("too many rows")
        return model(frame)

    engine = KernelEngine(big_calls_refused, numeric.iloc[:20], link="logit")
    with pytest.raises(ModelError, match=r"^explaining row_ids r24-r29: too many rows$"):
        engine.explain(rows, list(range(6)), nsamples=60, batch_rows=6, row_ids=ids)
    # An endpoint's refused request is not sent again, row by row: the call's rows are named.
    engine = KernelEngine(predict, numeric.iloc[:20], link="logit", calls_are_cheap=False)
    with pytest.raises(ModelError, match=r"^explaining row_ids r24-r29: refused a value$"):
        engine.explain(rows, list(range(6)), nsamples=60, batch_rows=6, row_ids=ids)
