"""Kernel SHAP to a stated accuracy: exact where it fits, honest standard errors, stopping at the tolerance."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from shapline.tasks.common.config import parse_config
from shapline.tasks.common.errors import ConfigError
from shapline.tasks.explainers.adaptive import MIN_ROUNDS, enumerated_count, hybrid_degree, size_mass
from shapline.tasks.explainers.kernel_engine import KernelEngine
from tests.helpers import exact_shapley


def interacting(columns: int, seed: int = 0):  # noqa: ANN201 - a model function and its weights
    """A smooth model with pairwise and three-way interactions (no explainer is exact on it by luck)."""
    rng = np.random.default_rng(seed)
    linear = rng.normal(size=columns)
    pairs = rng.normal(size=(columns, columns)) / columns
    triples = rng.normal(size=columns) / 2

    def f(rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=float)
        third = np.roll(rows, 1, axis=1) * np.roll(rows, 2, axis=1) * rows
        out = rows @ linear + np.einsum("ni,ij,nj->n", rows, pairs, rows) + np.tanh(third) @ triples
        return out.reshape(-1, 1)

    return f


def frames(columns: int, rows: int, seed: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    names = [f"f{i}" for i in range(columns)]
    return (
        pd.DataFrame(rng.normal(size=(12, columns)), columns=names),
        pd.DataFrame(rng.normal(size=(rows, columns)) + 0.5, columns=names),
    )


def engine_for(f, background: pd.DataFrame) -> KernelEngine:  # noqa: ANN001
    return KernelEngine(lambda frame: f(frame.to_numpy()), background, link="identity")


def test_every_coalition_within_the_budget_gives_the_exact_values_and_no_error() -> None:
    f = interacting(6)
    background, rows = frames(6, 4)
    found = engine_for(f, background).explain_adaptive(rows, [1, 2, 3, 4], budget=62, tolerance=0.005)
    for i in range(4):
        exact = exact_shapley(lambda a: f(a)[:, 0], rows.to_numpy()[i], background.to_numpy())
        np.testing.assert_allclose(found.values[i, :, 0], exact, atol=1e-10)
    assert not found.errors.any() and found.converged.all()
    assert (found.coalitions == 2**6 - 2).all() and (found.model_rows == 62 * 12).all()


def test_the_values_add_up_exactly_whatever_was_sampled() -> None:
    f = interacting(14)
    background, rows = frames(14, 5)
    engine = engine_for(f, background)
    found = engine.explain_adaptive(rows, range(5), budget=400, tolerance=1e-6)
    assert (found.coalitions < 2**14 - 2).all()  # sampled, not enumerated
    gap = found.values.sum(axis=1) - (found.fx - engine.expected_value)
    assert np.abs(gap).max() < 1e-10


def test_a_row_is_the_same_alone_in_a_batch_or_in_another_shard() -> None:
    f = interacting(12)
    background, rows = frames(12, 6)
    seeds = [11, 12, 13, 14, 15, 16]
    engine = engine_for(f, background)
    together = engine.explain_adaptive(rows, seeds, budget=500, tolerance=0.002, batch_rows=4)
    alone = [
        engine.explain_adaptive(rows.iloc[[i]], [seeds[i]], budget=500, tolerance=0.002) for i in range(6)
    ]
    later = engine.explain_adaptive(rows.iloc[3:], seeds[3:], budget=500, tolerance=0.002, batch_rows=2)
    # The same coalitions, row by row; the values equal up to the model's rounding on calls of other sizes.
    for i in range(6):
        assert together.coalitions[i] == alone[i].coalitions[0]
        np.testing.assert_allclose(together.values[i], alone[i].values[0], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(together.errors[i], alone[i].errors[0], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(together.values[3:], later.values, rtol=1e-12, atol=1e-15)
    other_seed = engine.explain_adaptive(rows.iloc[[0]], [99], budget=500, tolerance=0.002)
    assert not np.array_equal(other_seed.values[0], together.values[0])


def test_nominal_95_percent_intervals_cover_the_exact_values() -> None:
    """The standard errors are honest: +-1.96 of them covers the exact value about 95% of the time."""
    f = interacting(10, seed=3)
    background, rows = frames(10, 40, seed=4)
    found = engine_for(f, background).explain_adaptive(rows, range(40), budget=400, tolerance=1e-9)
    covered, errors = [], []
    for i in range(40):
        exact = exact_shapley(lambda a: f(a)[:, 0], rows.to_numpy()[i], background.to_numpy())
        covered.append(np.abs(found.values[i, :, 0] - exact) <= 1.96 * found.errors[i, :, 0])
        errors.append(np.abs(found.values[i, :, 0] - exact))
    coverage = float(np.mean(covered))
    assert 0.88 <= coverage <= 0.995, coverage
    assert found.errors.max() > 0 and not found.converged.any()  # the tolerance was out of reach


def test_an_additive_model_stops_at_the_first_check() -> None:
    """Paired coalitions explain an additive model exactly: no error left, so no round past the first check."""
    rng = np.random.default_rng(5)
    weights = rng.normal(size=(20, 1))
    background, rows = frames(20, 3)
    found = engine_for(lambda a: np.asarray(a) @ weights, background).explain_adaptive(
        rows, [1, 2, 3], budget=2088, tolerance=0.005
    )
    first_rounds = enumerated_count(20, hybrid_degree(20, 2088)) + 2 * MIN_ROUNDS * 20
    assert found.converged.all() and (found.coalitions == first_rounds).all()
    assert found.coalitions.max() < 2088 / 5
    expected = (rows.to_numpy() - background.to_numpy().mean(axis=0)) * weights[:, 0]
    np.testing.assert_allclose(found.values[:, :, 0], expected, atol=1e-9)


def test_the_tolerance_trades_coalitions_for_accuracy() -> None:
    f = interacting(16, seed=7)
    background, rows = frames(16, 6, seed=8)
    loose = engine_for(f, background).explain_adaptive(rows, range(6), budget=4000, tolerance=0.05)
    tight = engine_for(f, background).explain_adaptive(rows, range(6), budget=4000, tolerance=0.002)
    assert loose.coalitions.mean() < tight.coalitions.mean()
    assert loose.errors.max() > tight.errors.max()


def test_the_hybrid_enumerates_what_kernelshap_does_within_the_budget() -> None:
    assert hybrid_degree(30, 2108) == 1 and hybrid_degree(13, 2074) == 2 and hybrid_degree(13, 300) == 1
    assert enumerated_count(30, 1) == 60 and enumerated_count(13, 2) == 2 * (13 + 78)
    assert size_mass(7).sum() == pytest.approx(1.0) and size_mass(7)[0] == pytest.approx(size_mass(7)[-1])


@pytest.mark.parametrize(
    ("explainer", "message"),
    [
        ({"estimator": "adaptive", "l1_reg": "aic"}, r"explainer\.l1_reg 'aic' is for estimator shap"),
        ({"estimator": "adaptive", "l1_reg": "num_features(5)"}, r"explainer\.l1_reg 'num_features\(5\)'"),
        ({"estimator": "adaptive", "tolerance": 0}, r"explainer\.tolerance: Input should be greater than 0"),
        ({"estimator": "adaptive", "tolerance": 1.5}, r"explainer\.tolerance: Input should be less than 1"),
        ({"estimator": "sampled"}, r"explainer\.estimator: Input should be 'shap' or 'adaptive'"),
    ],
)
def test_settings_the_adaptive_estimator_cannot_honour_are_refused(explainer: dict, message: str) -> None:
    raw = {
        "model": {"name": "m", "kind": "sklearn", "path": "/m"},
        "data": {"source": "/d.csv"},
        "explainer": explainer,
    }
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, "c.yaml")


def test_l1_reg_false_or_left_out_is_fine_with_adaptive() -> None:
    base = {"model": {"name": "m", "kind": "sklearn", "path": "/m"}, "data": {"source": "/d.csv"}}
    for explainer in ({"estimator": "adaptive"}, {"estimator": "adaptive", "l1_reg": False}):
        config = parse_config({**base, "explainer": explainer})
        assert config.explainer.effective_l1_reg is False
    # shap's runs keep their values and their shard stores: the hash is as before adaptive existed.
    shap_run = parse_config(base)
    assert "estimator" not in shap_run.to_yaml() or shap_run.explainer.estimator == "shap"
    assert (
        parse_config({**base, "explainer": {"estimator": "adaptive"}}).values_sha256()
        != shap_run.values_sha256()
    )
