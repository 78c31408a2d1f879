"""shapline's lasso LARS path against scikit-learn's lars_path_gram, number for number."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.linear_model import lars_path_gram

from shapline.tasks.explainers import native
from shapline.tasks.explainers.kernel_engine import _Design, _draw_coalitions
from shapline.tasks.explainers.lars import lasso_path_gram, python_lasso_path_gram


def assert_same_path(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Both paths on the same Gram and X'y; equal bit for bit, warnings included."""
    gram, xy = x.T @ x, x.T @ y
    eps = np.finfo(float).eps
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        expected = lars_path_gram(
            xy, gram, n_samples=len(x), alpha_min=0.0, method="lasso", max_iter=500, eps=eps
        )
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        got = lasso_path_gram(xy, gram, n_samples=len(x), max_iter=500, eps=eps)
    np.testing.assert_array_equal(got[0], expected[0])
    assert [int(i) for i in got[1]] == [int(i) for i in expected[1]]
    np.testing.assert_array_equal(got[2], expected[2])
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    return got


@pytest.mark.parametrize("seed", range(12))
def test_kernel_shap_designs_give_scikit_learns_path(seed: int) -> None:
    """The designs the engine solves: 30 features, nsamples auto, an interaction-heavy target."""
    masks, weights, _, _ = _draw_coalitions(30, "auto", np.random.RandomState(seed))
    design = _Design(masks, weights)
    x, _ = design.centred()
    augmented, w_sqrt = design.augmented()
    rng = np.random.default_rng(seed)
    coef = rng.normal(size=30) * (rng.random(30) < 0.4)
    target = masks @ coef + 0.3 * masks[:, 0] * masks[:, 1] + rng.normal(scale=0.05, size=len(masks))
    y = np.hstack((target, target - coef.sum())) * w_sqrt
    assert_same_path(x, y - y.mean())


def correlated_design(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """80 centred rows of 4 features and 8 near-combinations of them, and a sparse target: the lasso
    drops variables on some of these paths."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(80, 4))
    x = np.hstack([base, base @ rng.normal(size=(4, 8)) + 0.05 * rng.normal(size=(80, 8))])
    y = x @ (rng.normal(size=12) * (rng.random(12) < 0.5)) + rng.normal(scale=0.5, size=80)
    return x - x.mean(axis=0), y - y.mean()


def test_paths_that_drop_variables_and_degenerate_regressors() -> None:
    """Correlated designs where the lasso drops variables, and a duplicated column (degenerate)."""
    drops = 0
    for seed in range(30):
        x, y = correlated_design(seed)
        alphas, active, _ = assert_same_path(x, y)
        drops += len(alphas) - 1 > len(active)  # each drop costs a step that adds no variable
    assert drops >= 3
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 5))
    x = np.hstack([x, x[:, :1]])  # a regressor equal to another
    assert_same_path(x - x.mean(axis=0), x[:, 0] * 2 - x[:, 1] + rng.normal(scale=0.1, size=50))


def kernel_problem(m: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """X'y and the Gram of the engine's scaled, centred design for m features (nsamples auto)."""
    masks, weights, _, _ = _draw_coalitions(m, "auto", np.random.RandomState(seed))
    design = _Design(masks, weights)
    x, gram = design.centred()
    _, w_sqrt = design.augmented()
    rng = np.random.default_rng(seed)
    coef = rng.normal(size=m) * (rng.random(m) < 0.5)
    target = masks @ coef + 0.3 * masks[:, 0] * masks[:, 1] + rng.normal(scale=0.05, size=len(masks))
    y = np.hstack((target, target - coef.sum())) * w_sqrt
    return np.dot(x.T, y - y.mean()), gram, len(x)


@pytest.mark.parametrize("m", [2, 3, 5, 7, 13, 30, 60])
def test_the_compiled_path_is_the_python_path_bit_for_bit(m: int) -> None:
    """The compiled path (numpy's own BLAS, scipy's LAPACK) gives every number the Python path gives; on
    these designs it never needs the Python path (no drop, no degenerate regressor)."""
    assert native.available(python_lasso_path_gram)
    eps = float(np.finfo(float).eps)
    for seed in range(15):
        xy, gram, n = kernel_problem(m, seed)
        got = native.lasso_path(xy, gram, n, 500, eps, python_lasso_path_gram)
        assert got is not None
        expected = python_lasso_path_gram(xy, gram, n, 500, eps)
        np.testing.assert_array_equal(got[0], expected[0])
        assert got[1] == [int(i) for i in expected[1]]
        np.testing.assert_array_equal(got[2], expected[2])


def test_paths_the_compiled_code_leaves_to_python() -> None:
    """A path that drops a variable, and one on 140 features: None, and lasso_path_gram then gives
    scikit-learn's path (the tests above)."""
    eps = float(np.finfo(float).eps)
    left = 0
    for seed in range(30):
        x, y = correlated_design(seed)
        alphas, active, _ = python_lasso_path_gram(x.T @ y, x.T @ x, 80, 500, eps)
        if len(alphas) - 1 > len(active):  # the path drops a variable
            assert native.lasso_path(x.T @ y, x.T @ x, 80, 500, eps, python_lasso_path_gram) is None
            left += 1
    assert left >= 3
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 140))
    x -= x.mean(axis=0)
    y = x @ rng.normal(size=140) + rng.normal(size=400)
    y -= y.mean()
    assert native.lasso_path(x.T @ y, x.T @ x, 400, 500, eps, python_lasso_path_gram) is None
    assert_same_path(x, y)


def test_without_numpys_blas_the_python_path_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A numpy built against another BLAS (no scipy_cblas_*64_ routines to call): the Python path."""
    monkeypatch.setattr(native, "_CHECKED", None)
    monkeypatch.setattr(native, "_routines", lambda: None)
    xy, gram, n = kernel_problem(13, 0)
    assert native.lasso_path(xy, gram, n, 500, float(np.finfo(float).eps), python_lasso_path_gram) is None
    assert not native.available(python_lasso_path_gram)
    expected = lars_path_gram(xy, gram, n_samples=n, alpha_min=0.0, method="lasso", max_iter=500)
    np.testing.assert_array_equal(lasso_path_gram(xy, gram, n)[2], expected[2])
