"""Attribution drift on its own: NDCG against sklearn's, the drift table, the same rows across runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import wasserstein_distance
from sklearn.metrics import ndcg_score

from shapline.tasks.monitoring.drift import (
    DRIFT_COLUMNS,
    compare_values,
    explained_signature,
    ndcg,
    same_rows,
    signed,
    wasserstein,
)


def _sk(relevance: dict[str, float], scores: dict[str, float]) -> float:
    features = sorted(set(relevance) | set(scores))
    return float(
        ndcg_score([[relevance.get(f, 0.0) for f in features]], [[scores.get(f, 0.0) for f in features]])
    )


@pytest.mark.parametrize("seed", range(25))
def test_ndcg_equals_sklearns_on_random_importance(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    names = [f"f{i}" for i in range(n)]
    relevance = dict(zip(names, rng.exponential(size=n), strict=True))
    scores = dict(zip(names, rng.exponential(size=n), strict=True))
    assert ndcg(relevance, scores) == pytest.approx(_sk(relevance, scores), abs=1e-12)


def test_ndcg_averages_over_ties_as_sklearn_does() -> None:
    relevance = {"a": 3.0, "b": 1.0, "c": 2.0, "d": 0.5}
    scores = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.2}  # three tied at the top
    assert ndcg(relevance, scores) == pytest.approx(_sk(relevance, scores), abs=1e-12)
    assert ndcg(relevance, scores) == pytest.approx(ndcg(relevance, {**scores}), abs=0)


def test_ndcg_over_the_union_of_features() -> None:
    relevance = {"a": 2.0, "b": 1.0}
    scores = {"b": 3.0, "c": 1.0}  # a is gone, c is new
    assert ndcg(relevance, scores) == pytest.approx(_sk(relevance, scores), abs=1e-12)
    assert ndcg(relevance, scores) < 1.0


def test_the_same_ranking_is_one() -> None:
    assert ndcg({"a": 3, "b": 2, "c": 1}, {"a": 30, "b": 20, "c": 10}) == pytest.approx(1.0)
    assert ndcg({"a": 0.0}, {"a": 1.0}) == 1.0  # nothing mattered: no ranking is worse


def _values(path, frame: pd.DataFrame, id_column: str | None = None) -> str:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if id_column:
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), b"shapline.id_column": id_column.encode()}
        )
    pq.write_table(table, path)
    return str(path)


def _frame(rng: np.random.Generator, rows: int, scales: dict[str, float]) -> pd.DataFrame:
    data = {"row_id": np.arange(rows)}
    data |= {name: rng.normal(0.0, scale, rows) for name, scale in scales.items()}
    data |= {"base_value": np.zeros(rows), "model_output": np.zeros(rows)}
    return pd.DataFrame(data)


def test_drift_table_columns_sort_and_values(tmp_path) -> None:
    rng = np.random.default_rng(0)
    before = _frame(rng, 400, {"a": 3.0, "b": 1.0, "c": 0.5})
    after = _frame(rng, 300, {"a": 0.5, "b": 1.0, "c": 3.0})
    comparison = compare_values(
        _values(tmp_path / "a.parquet", before), _values(tmp_path / "b.parquet", after), "base", 0.9
    )
    table = comparison.table
    assert list(table.columns) == DRIFT_COLUMNS
    assert table["change"].abs().is_monotonic_decreasing
    row = table.set_index("feature").loc["a"]
    assert row["baseline_mean_abs"] == pytest.approx(np.abs(before["a"]).mean())
    assert row["mean_abs"] == pytest.approx(np.abs(after["a"]).mean())
    assert row["change"] == pytest.approx(row["mean_abs"] - row["baseline_mean_abs"])
    assert row["wasserstein"] == pytest.approx(wasserstein_distance(after["a"], before["a"]))
    assert (row["baseline_rank"], row["rank"]) == (1, 3)
    relevance = {f: np.abs(before[f]).mean() for f in "abc"}
    scores = {f: np.abs(after[f]).mean() for f in "abc"}
    assert comparison.ndcg == pytest.approx(_sk(relevance, scores), abs=1e-12)
    assert comparison.drifted
    assert comparison.line().startswith(
        f"attribution drift: NDCG {comparison.ndcg:.3f} < 0.90 against run base"
    )


def test_several_classes_each_and_the_minimum(tmp_path) -> None:
    rng = np.random.default_rng(1)
    parts_a, parts_b = [], []
    for label, (sa, sb) in {
        "x": ({"a": 2, "b": 1}, {"a": 2, "b": 1}),
        "y": ({"a": 2, "b": 1}, {"a": 1, "b": 2}),
    }.items():
        parts_a.append(_frame(rng, 100, sa).assign(**{"class": label}))
        parts_b.append(_frame(rng, 100, sb).assign(**{"class": label}))
    order = ["row_id", "class", "a", "b", "base_value", "model_output"]
    comparison = compare_values(
        _values(tmp_path / "a.parquet", pd.concat(parts_a)[order]),
        _values(tmp_path / "b.parquet", pd.concat(parts_b)[order]),
        "base",
        0.99,
    )
    assert list(comparison.table.columns) == ["feature", "class", *DRIFT_COLUMNS[1:]]
    assert set(comparison.ndcg_by_class) == {"x", "y"}
    assert comparison.ndcg == min(comparison.ndcg_by_class.values())
    assert comparison.ndcg_by_class["x"] == pytest.approx(1.0)
    assert comparison.ndcg_by_class["y"] < 1.0


def test_identical_values_are_no_drift(tmp_path) -> None:
    frame = _frame(np.random.default_rng(2), 200, {"a": 1.0, "b": 2.0})
    path = _values(tmp_path / "a.parquet", frame)
    comparison = compare_values(path, path, "base", 0.9)
    assert comparison.ndcg == pytest.approx(1.0)
    assert not comparison.drifted
    assert (comparison.table["wasserstein"] == 0).all()


def test_same_rows_by_id_column(tmp_path) -> None:
    rng = np.random.default_rng(3)
    a = _frame(rng, 6, {"x": 1.0, "y": 1.0}).assign(customer=[f"c{i}" for i in range(6)])
    b = a.iloc[::-1].copy()  # the same customers, another order, plus one new and one gone
    b["row_id"] = np.arange(6)
    b.loc[b["customer"] == "c2", "x"] += 5.0
    b = pd.concat([b[b["customer"] != "c5"], b.iloc[:1].assign(customer="c9")])
    order = ["row_id", "customer", "x", "y", "base_value", "model_output"]
    found = same_rows(
        _values(tmp_path / "a.parquet", a[order], "customer"),
        _values(tmp_path / "b.parquet", b[order], "customer"),
    )
    assert found is not None
    assert (found.rows_in_both, found.rows_only_a, found.rows_only_b) == (5, 1, 1)
    top = found.moved_rows.iloc[0]
    assert (top["customer"], top["most_moved_feature"]) == ("c2", "x")
    assert top["total_abs_diff"] == pytest.approx(5.0)
    assert found.per_feature.iloc[0]["feature"] == "x"


def test_runs_without_an_id_column_have_no_same_rows(tmp_path) -> None:
    frame = _frame(np.random.default_rng(4), 5, {"x": 1.0})
    path = _values(tmp_path / "a.parquet", frame)
    assert same_rows(path, path) is None


def test_signature_and_sign() -> None:
    params = {
        "model.output": "predict_proba",
        "model.class_index": "2",
        "explainer.units": "log-odds",
        "model.class_label": "Chinstrap",
    }
    assert explained_signature(params) != explained_signature({**params, "explainer.units": "probability"})
    assert explained_signature(params) != explained_signature({**params, "model.class_label": "Adelie"})
    assert explained_signature(params) == explained_signature({**params, "shards.workers": "4"})
    assert signed(0.314) == "+0.31" and signed(-0.12) == "\u22120.12"


@pytest.mark.parametrize("seed", range(12))
def test_wasserstein_is_scipys_bit_for_bit(seed: int) -> None:
    """Random sizes (one point included), and every third case rounded so the samples share many ties."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=int(rng.integers(1, 3000)))
    v = rng.normal(loc=0.3, scale=1.5, size=int(rng.integers(1, 3000)))
    if seed % 3 == 0:
        u, v = np.round(u, 1), np.round(v, 1)
    assert wasserstein(u, v) == wasserstein_distance(u, v)
    assert wasserstein(v, v) == 0.0
    counts_u, counts_v = np.floor(u * 3).astype(int), np.floor(v * 3).astype(int)  # integer samples
    assert wasserstein(counts_u, counts_v) == wasserstein_distance(counts_u, counts_v)
    assert np.isnan(wasserstein(u, np.empty(0)))


def _scaled(rows: int, scales: dict[str, float]) -> pd.DataFrame:
    """Values whose mean |value| per feature is exactly its scale (half the rows +scale, half -scale)."""
    signs = np.where(np.arange(rows) % 2 == 0, 1.0, -1.0)
    data = {"row_id": np.arange(rows), **{name: signs * scale for name, scale in scales.items()}}
    return pd.DataFrame({**data, "base_value": np.zeros(rows), "model_output": np.zeros(rows)})


def test_a_feature_that_collapses_is_drift_though_ndcg_holds(tmp_path) -> None:
    """NDCG weighs the order at the top: a mid-ranked feature falling to 0 barely moves it."""
    before = _scaled(10, {"a": 2.0, "b": 0.9, "c": 0.8, "d": 0.7, "tiny": 0.01})
    after = _scaled(10, {"a": 2.8, "b": 0.0, "c": 0.75, "d": 0.7, "tiny": 0.02})
    paths = _values(tmp_path / "a.parquet", before), _values(tmp_path / "b.parquet", after)
    ndcg_only = compare_values(*paths, "base", 0.9)
    assert ndcg_only.ndcg >= 0.9 and not ndcg_only.drifted and ndcg_only.importance_drift == []
    ruled = compare_values(*paths, "base", 0.9, max_importance_change=0.5)
    relative = ruled.table.set_index("feature")["relative_change"]
    assert relative["b"] == pytest.approx(-1.0) and relative["a"] == pytest.approx(0.4)
    # tiny doubled, but below 1% of the largest importance in both runs: noise, not judged.
    assert relative["tiny"] == pytest.approx(1.0)
    assert ruled.drifted and ruled.importance_drift == [("b", pytest.approx(-1.0))]
    assert ruled.line() == (
        f"attribution drift: NDCG {ruled.ndcg:.3f} >= 0.90 against run base; importance changed by more than "
        "50%: b (\u2212100%); top movers: b (\u22120.90), a (+0.80)"
    )
    assert ruled.to_json()["importance_drift"] == [{"feature": "b", "relative_change": pytest.approx(-1.0)}]
    loose = compare_values(*paths, "base", 0.9, max_importance_change=1.5)
    assert not loose.drifted and loose.sentence().endswith(
        "; no feature's importance changed by more than 150%"
    )


def test_a_feature_new_in_this_run_is_over_any_limit(tmp_path) -> None:
    before = _scaled(4, {"a": 1.0, "b": 0.0})
    after = _scaled(4, {"a": 1.0, "b": 0.5})
    ruled = compare_values(
        _values(tmp_path / "a.parquet", before), _values(tmp_path / "b.parquet", after), "base", 0.5, 10.0
    )
    assert ruled.importance_drift == [("b", np.inf)]
    assert "importance changed by more than 1000%: b (new: from 0)" in ruled.sentence()
    assert ruled.to_json()["importance_drift"] == [{"feature": "b", "relative_change": None}]


def test_no_change_is_no_mover_and_small_changes_keep_their_digits(tmp_path) -> None:
    path = _values(tmp_path / "a.parquet", _scaled(4, {"a": 1.0, "b": 0.5}))
    same = compare_values(path, path, "base", 0.9)
    assert same.movers_text() == "none (every feature's importance is the same)"
    assert signed(0.0041) == "+0.0041" and signed(-0.004) == "\u22120.004" and signed(0.0) == "+0.00"


def test_rows_that_did_not_move_are_not_rows_that_moved_most(tmp_path) -> None:
    frame = _frame(np.random.default_rng(5), 6, {"x": 1.0}).assign(customer=[f"c{i}" for i in range(6)])
    order = ["row_id", "customer", "x", "base_value", "model_output"]
    path = _values(tmp_path / "a.parquet", frame[order], "customer")
    found = same_rows(path, path)
    assert found is not None and found.rows_in_both == 6 and found.moved_rows.empty
