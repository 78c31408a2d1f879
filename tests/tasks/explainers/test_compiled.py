"""The engine's compiled loops against the numpy expressions they replace (shap's and scikit-learn's): bit for bit."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from shapline.tasks.explainers import compiled
from shapline.tasks.explainers.kernel_engine import KernelEngine, _Buffers, _draw_coalitions


def numpy_fill(palette: np.ndarray, coalitions: np.ndarray, owners: np.ndarray, n: int) -> np.ndarray:
    """One column of a call, as numpy writes it: x's values, the background tiled, x written into its coalitions."""
    b = len(palette) - n
    out = np.empty(b + len(coalitions) * n, dtype=palette.dtype)
    out[:b] = palette[n:]
    tiled = out[b:].reshape(-1, n)
    tiled[...] = palette[:n]
    for i in range(b):
        tiled[coalitions & (owners == i)] = palette[n + i]
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int8, np.uint16, np.bool_])
def test_fill_writes_the_rows_numpy_writes(dtype: type) -> None:
    rng = np.random.default_rng(0)
    n, b, units, columns = 7, 3, 40, 5
    palettes = (rng.normal(size=(columns, n + b)) * 50).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        palettes[0, [1, n + 1]] = np.nan  # a missing value in the background and in x
    coalitions = rng.random((units, columns)) < 0.5
    owners = np.sort(rng.integers(0, b, size=units))
    out = np.empty((columns, b + units * n), dtype=dtype)
    compiled.fill_synthetic(out, palettes, coalitions, owners, n)
    for k in range(columns):
        np.testing.assert_array_equal(out[k], numpy_fill(palettes[k], coalitions[:, k], owners, n))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.bool_, np.intp])
def test_fill_rows_writes_the_rows_fill_synthetic_writes(dtype: type) -> None:
    """A deduplicated call writes only its distinct rows: each the very row of the whole call."""
    rng = np.random.default_rng(1)
    n, b, units, columns = 6, 2, 30, 4
    palettes = (rng.normal(size=(columns, n + b)) * 50).astype(dtype)
    coalitions = rng.random((units, columns)) < 0.5
    owners = np.sort(rng.integers(0, b, size=units))
    whole = np.empty((columns, b + units * n), dtype=dtype)
    compiled.fill_synthetic(whole, palettes, coalitions, owners, n)
    rows = np.sort(rng.choice(whole.shape[1], size=70, replace=False)).astype(np.intp)
    rows[:2] = [0, 1]  # the explained rows too
    out = np.empty((columns, len(rows)), dtype=dtype)
    compiled.fill_rows(out, palettes, coalitions, owners, n, rows)
    np.testing.assert_array_equal(out, whole[:, rows])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int16, np.int8, np.bool_])
@pytest.mark.parametrize("order", ["C", "F"])
def test_the_fills_by_row_write_the_rows_the_fills_by_column_write(dtype: type, order: str) -> None:
    """A row-major call (a model that reads rows: XGBoost) holds the very numbers of a column-major one,
    the whole call and a deduplicated call's rows, whichever layout the call's coalitions come in."""
    rng = np.random.default_rng(2)
    n, b, units, columns = 5, 3, 30, 6
    palettes = (rng.normal(size=(columns, n + b)) * 50).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        palettes[0, [1, n + 1]] = np.nan
        # A NaN with a payload of its own, in the background and in x: copied bit for bit.
        compiled.as_bits(palettes)[1, [2, n]] = compiled.as_bits(np.array([np.nan], dtype=dtype))[0] | 1
    coalitions = np.asarray(rng.random((units, columns)) < 0.5, order=order)
    owners = np.sort(rng.integers(0, b, size=units))
    by_column = np.empty((columns, b + units * n), dtype=dtype)
    compiled.fill_synthetic(by_column, palettes, coalitions, owners, n)
    by_row = np.empty((b + units * n, columns), dtype=dtype)
    bits = compiled.as_bits(np.ascontiguousarray(palettes.T))
    compiled.fill_synthetic_by_row(compiled.as_bits(by_row), bits, coalitions, owners, n)
    np.testing.assert_array_equal(
        compiled.as_bits(by_row), compiled.as_bits(np.ascontiguousarray(by_column.T))
    )
    rows = np.sort(rng.choice(by_column.shape[1], size=50, replace=False)).astype(np.intp)
    rows[:2] = [0, 2]
    some = np.empty((len(rows), columns), dtype=dtype)
    compiled.fill_rows_by_row(compiled.as_bits(some), bits, coalitions, owners, n, rows)
    np.testing.assert_array_equal(some, by_column.T[rows])


def test_the_engine_fills_a_frame_of_every_kind_of_column_as_before() -> None:
    """numpy dtypes the loop writes, one it does not (datetime), an extension type (text) and a category."""
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {
            "x": rng.normal(size=12),
            "k": rng.integers(0, 5, size=12),
            "flag": rng.random(12) < 0.5,
            "when": pd.date_range("2026-01-01", periods=12, freq="D"),
            "text": pd.array([f"t{i % 4}" for i in range(12)], dtype="str"),
            "kind": pd.Categorical([f"c{i % 3}" for i in range(12)]),
        }
    )
    engine = KernelEngine(lambda f: np.zeros((len(f), 1)), frame.iloc[:6])
    data = engine._prepare(engine._as_rows(frame.iloc[6:]))
    plans = [engine._plan(data, i, 10 + i, 40) for i in range(3)]
    batch = engine._batch(plans, data, np.arange(3))
    built = engine._assemble(*engine._fill(batch, _Buffers()))
    n, units = 6, batch.unit_mask[3:]
    owners = batch.unit_plan[3:]
    for j, column in enumerate(frame.columns):
        palette = pd.concat([frame[column].iloc[:6], frame[column].iloc[6:9]], ignore_index=True)
        positions = numpy_fill(np.arange(n + 3), units[:, j], owners, n)
        expected = palette.take(positions).reset_index(drop=True)
        pd.testing.assert_series_equal(built[column].reset_index(drop=True), expected, check_names=False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("outputs", [1, 3])
def test_background_mean_adds_in_shaps_order(dtype: type, outputs: int) -> None:
    rng = np.random.default_rng(2)
    n, units = 50, 300
    values = rng.random((units * n, outputs)).astype(dtype)
    weights = rng.random(n)
    weights /= weights.sum()
    expected = np.zeros((units, outputs))
    per_unit = values.reshape(units, n, outputs).astype(float)
    for r in range(n):  # shap's _exp_val: background row by background row
        expected += per_unit[:, r, :] * weights[r]
    ey = np.zeros((units, outputs))
    compiled.background_mean(values, weights, ey)
    np.testing.assert_array_equal(ey, expected)


@pytest.mark.parametrize("m", [2, 5, 13, 30])
def test_the_regression_design_is_shaps_scaled_and_centred_as_scikit_learn_does(m: int) -> None:
    for seed in range(4):
        masks, kernel_weights, _, _ = _draw_coalitions(m, "auto", np.random.RandomState(seed))
        rows = len(masks)
        s = np.sum(masks, 1)
        w_sqrt = np.sqrt(np.hstack((kernel_weights * (m - s), kernel_weights * s)))  # shap's solve
        design = np.transpose(w_sqrt * np.transpose(np.vstack((masks, masks - 1))))
        got, got_w = compiled.augmented_design(masks, kernel_weights)
        np.testing.assert_array_equal(got, design)
        np.testing.assert_array_equal(got_w, w_sqrt)
        assert got.shape == (2 * rows, m) and got.flags.c_contiguous

        # StandardScaler(with_mean=False)'s corrected two-pass variance, then LassoLarsIC's centring.
        n = float(len(design))
        mean = np.sum(design, axis=0) / n
        deviation = design - mean
        correction = np.sum(deviation, axis=0)
        variance = (np.sum(deviation**2, axis=0) - correction**2 / n) / n
        eps = np.finfo(np.float64).eps
        scale = np.sqrt(variance)
        scale[variance <= n * eps * variance + (n * mean * eps) ** 2] = 1.0
        scaled = design / scale
        scaled -= np.mean(scaled, axis=0)
        np.testing.assert_array_equal(compiled.scaled_centred(design), scaled)


def test_a_constant_column_keeps_scale_one() -> None:
    design = np.ones((10, 3))
    design[:, 1] = np.arange(10.0)
    scaled = compiled.scaled_centred(design)
    np.testing.assert_array_equal(scaled[:, 0], np.zeros(10))
    np.testing.assert_allclose(scaled[:, 1], (np.arange(10.0) - 4.5) / np.std(np.arange(10.0)))


def test_shuffle_swaps_say_when_the_outputs_ran_out() -> None:
    swaps = np.empty((3, 9), dtype=np.int32)
    assert compiled.shuffle_swaps(np.zeros(5, dtype=np.uint32), 0, swaps) == -1
    assert compiled.shuffle_swaps(np.zeros(27, dtype=np.uint32), 0, swaps) == 27  # 0 is never rejected
    np.testing.assert_array_equal(swaps, 0)


def test_warm_up_loads_what_a_shard_calls() -> None:
    """In a fresh process, after the warm-up, explaining numbers, text, categories and missing values (float32
    or not, deduplicated or not) loads no more machine code: a shard never pays numba's dispatch and cache
    load (~5 ms a signature, measured in a flow's first shard)."""
    script = textwrap.dedent(
        """
        import itertools
        import numpy as np, pandas as pd
        from shapline.tasks.explainers import compiled
        from shapline.tasks.explainers.kernel_engine import KernelEngine

        def signatures():
            found = {}
            for name in compiled.__all__:
                function = getattr(compiled, name)
                if hasattr(function, "signatures"):
                    found[name] = set(function.signatures)
            return found

        compiled.warm_up()
        loaded = signatures()
        assert len(loaded["fill_synthetic"]) >= 4 and len(loaded["background_mean"]) >= 2, loaded
        rng = np.random.default_rng(3)
        frame = pd.DataFrame(
            {
                "a": rng.normal(size=40),
                "b": rng.integers(0, 5, size=40),
                "c": pd.array(rng.choice(["x", "y", None], size=40), dtype="str"),
                "d": rng.random(40) < 0.5,
                "e": pd.Categorical(rng.choice(["p", "q"], size=40)),
                "f": np.where(rng.random(40) < 0.2, np.nan, rng.normal(size=40)),
            }
        )

        def model(rows):
            score = rows["a"].to_numpy(float) + rows["f"].fillna(0).to_numpy(float)
            if "b" in rows:
                score = score + rows["b"].to_numpy(float)
            if "c" in rows:
                score = score + (rows["c"] == "x").to_numpy(float)
            return score.reshape(-1, 1)

        for columns in (list(frame.columns), ["a", "b", "f"], ["a", "f"]):
            for float32, dedupe, row_major in itertools.product((True, False), repeat=3):
                engine = KernelEngine(model, frame[columns].iloc[:10], float32=float32, row_major=row_major)
                rows = frame[columns].iloc[10:14]
                engine.explain(rows, seeds=[0, 1, 2, 3], nsamples=60, batch_rows=2, dedupe=dedupe)
        added = {name: found - loaded[name] for name, found in signatures().items() if found - loaded[name]}
        print(added or "none")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "none"


def test_compiles_in_process_where_no_cache_can_be_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only install with no writable home: numba refuses cache=True at decoration; compile anyway."""
    from numba.core import caching

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])

    def twice(x: float) -> float:
        return 2.0 * x

    with pytest.raises(RuntimeError, match="no locator"):
        import numba

        numba.njit(cache=True)(twice)
    assert compiled._compiled(twice)(1.5) == 3.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_same_as_background_is_numpys_isclose_all(dtype: type) -> None:
    """Close by numpy's rule in the arrays' own precision (rtol * |background|), NaN equal to NaN,
    infinities equal only to themselves, and values right at the tolerance on either side of it."""
    rng = np.random.default_rng(7)
    background = rng.normal(size=(40, 12)).astype(dtype)
    special = np.array([np.nan, np.inf, -np.inf, 0.0, 1e-9, -0.0], dtype=dtype)
    background[rng.random(background.shape) < 0.1] = rng.choice(special, size=1)[0]
    rtol, atol = dtype(1e-05), dtype(1e-08)
    for trial in range(300):
        x = background[trial % 40].copy()
        if trial % 3:
            # Step each value by about the tolerance, so some land just inside and some just outside.
            step = (atol + rtol * np.abs(x)) * rng.choice([0.5, 0.999, 1.0, 1.001, 2.0], size=12)
            x = (x + step.astype(dtype) * rng.choice([-1, 1], size=12)).astype(dtype)
        if trial % 7 == 0:
            x[rng.integers(12)] = rng.choice(special)
        same = background.copy()
        same[:] = x  # every background row equal to x: all columns the same
        for rows in (background, same, np.vstack([same[:5], background[:1]])):
            expected = np.isclose(x, rows, equal_nan=True).all(axis=0)
            np.testing.assert_array_equal(compiled.same_as_background(x, rows, rtol, atol), expected)


def test_eliminated_design_is_shaps_expressions() -> None:
    for seed in range(3):
        masks, kernel_weights, _, _ = _draw_coalitions(9, "auto", np.random.RandomState(seed))
        selected = np.array([0, 2, 3, 5, 8], dtype=np.intp)
        last = selected[-1]
        etmp = np.transpose(np.transpose(masks[:, selected[:-1]]) - masks[:, last])  # shap's solve
        weighted = kernel_weights[:, None] * etmp
        got, got_weighted = compiled.eliminated_design(masks, selected[:-1], int(last), kernel_weights)
        np.testing.assert_array_equal(got, etmp)
        np.testing.assert_array_equal(got_weighted, weighted)
        # The same layouts into the same BLAS calls (shap's are Fortran-ordered).
        for mine, shaps in ((got, etmp), (got_weighted, weighted)):
            assert (mine.flags.c_contiguous, mine.flags.f_contiguous) == (
                shaps.flags.c_contiguous,
                shaps.flags.f_contiguous,
            )
        np.testing.assert_array_equal(got.T @ got_weighted, etmp.T @ weighted)
