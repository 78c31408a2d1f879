from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shapline.tasks.common.errors import ExplainError
from shapline.tasks.common.schemas import SchemaError, check_columns, importance_columns, values_columns
from shapline.tasks.explainers.explain import ShardValues
from shapline.tasks.results.aggregate import aggregate, combine_shards

FEATURES = ["a", "b", "c"]


def write_shards(
    tmp_path: Path, labels: list[str], sizes: list[int], seed: int = 0, features: list[str] = FEATURES
) -> tuple[list[str], pd.DataFrame]:
    rng = np.random.default_rng(seed)
    paths, frames, start = [], [], 0
    for index, size in enumerate(sizes):
        values = rng.normal(size=(size, len(features), len(labels)))
        base = np.full((size, len(labels)), 0.5)
        shard = ShardValues(
            row_ids=np.arange(start, start + size) * 2,
            features=features,
            labels=labels,
            values=values,
            base_values=base,
            model_output=base + values.sum(axis=1) + 1e-3 * index,
            algorithm="kernel",
            link="identity",
        )
        frame = shard.to_table().to_pandas()
        path = tmp_path / f"shard-{index}.parquet"
        frame.to_parquet(path, index=False)
        paths.append(str(path))
        frames.append(frame)
        start += size
    return paths, pd.concat(frames, ignore_index=True)


def test_single_output_values_importance_and_additivity(tmp_path: Path) -> None:
    paths, expected = write_shards(tmp_path, ["0"], [4, 4, 3])
    result = aggregate(
        paths, tmp_path / "values.parquet", FEATURES, ["mean_abs", "mean", "median", "mean_sq", "std"]
    )
    values = pd.read_parquet(result.values_path)
    check_columns(values, values_columns(FEATURES, False), "shap_values.parquet")
    pd.testing.assert_frame_equal(values, expected)
    assert result.rows_explained == 11 and result.labels == []
    assert result.additivity_max_error == pytest.approx(2e-3)
    importance = result.importance.set_index("feature")
    for feature in FEATURES:
        column = expected[feature]
        assert importance.loc[feature, "mean_abs"] == pytest.approx(column.abs().mean())
        assert importance.loc[feature, "median"] == pytest.approx(column.median())
        assert importance.loc[feature, "mean_sq"] == pytest.approx((column**2).mean())
        assert importance.loc[feature, "std"] == pytest.approx(column.std(ddof=0))
    ranked = expected[FEATURES].abs().mean().sort_values(ascending=False).index.tolist()
    assert result.importance.sort_values("rank")["feature"].tolist() == ranked
    assert list(result.importance.columns) == importance_columns(
        ["mean_abs", "mean", "median", "mean_sq", "std"], False
    )


def test_several_classes_rank_within_each_class(tmp_path: Path) -> None:
    paths, expected = write_shards(tmp_path, ["no", "yes"], [3, 2])
    result = aggregate(paths, tmp_path / "values.parquet", FEATURES, ["mean_abs"])
    assert result.labels == ["no", "yes"] and result.rows_explained == 5
    assert list(result.importance.columns) == ["class", "feature", "mean_abs", "rank"]
    for label in ["no", "yes"]:
        part = result.importance[result.importance["class"] == label]
        assert sorted(part["rank"]) == [1, 2, 3]
        top = part.loc[part["rank"] == 1, "feature"].item()
        assert top == expected[expected["class"] == label][FEATURES].abs().mean().idxmax()


@pytest.mark.parametrize("labels", [["0"], ["no", "yes", "maybe"]])
def test_additivity_and_row_count_equal_a_pandas_reference(tmp_path: Path, labels: list[str]) -> None:
    # Twelve features: enough for a row sum in another order (numpy's pairwise blocks) to round differently.
    features = [f"x{j}" for j in range(12)]
    paths, _ = write_shards(tmp_path, labels, [500, 700, 300], features=features)
    rows, worst, found = combine_shards(paths, tmp_path / "values.parquet", features)
    expected_rows, expected_worst = 0, 0.0
    for path in paths:
        frame = pd.read_parquet(path)
        gap = frame["base_value"].to_numpy() + frame[features].to_numpy().sum(axis=1) - frame["model_output"]
        expected_worst = max(expected_worst, float(np.nanmax(np.abs(gap.to_numpy()))))
        expected_rows += len(np.unique(frame["row_id"]))
    assert (rows, worst) == (expected_rows, expected_worst)
    assert found == ([] if len(labels) == 1 else labels)
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "values.parquet"),
        pd.concat(map(pd.read_parquet, paths), ignore_index=True),
    )


def test_a_shard_with_other_columns_is_named(tmp_path: Path) -> None:
    paths, _ = write_shards(tmp_path, ["0"], [2, 2])
    pd.read_parquet(paths[1]).drop(columns=["model_output"]).to_parquet(paths[1], index=False)
    with pytest.raises(SchemaError, match="shard shard-1.parquet: expected columns"):
        aggregate(paths, tmp_path / "values.parquet", FEATURES, ["mean_abs"])


def test_out_of_order_shards_are_refused(tmp_path: Path) -> None:
    paths, _ = write_shards(tmp_path, ["0"], [2, 2])
    with pytest.raises(ValueError, match="out of order"):
        aggregate(list(reversed(paths)), tmp_path / "values.parquet", FEATURES, ["mean_abs"])
    shuffled = pd.read_parquet(paths[0]).iloc[::-1]
    shuffled.to_parquet(paths[0], index=False)
    with pytest.raises(ValueError, match="shard-0.parquet: rows are out of order"):
        aggregate(paths, tmp_path / "values.parquet", FEATURES, ["mean_abs"])


def test_schema_check_names_the_table() -> None:
    with pytest.raises(SchemaError, match="shap_values.parquet: expected columns"):
        check_columns(pd.DataFrame({"x": [1]}), values_columns(FEATURES, False), "shap_values.parquet")


@pytest.mark.parametrize(
    ("gap", "message"),
    [
        (
            9.4,
            r"additivity: row_id 2: base_value \+ the sum of its SHAP values misses its model output .* by 9\.4",
        ),
        (float("nan"), r"row_id 2 has a SHAP value, base value or model output that is NaN or infinite"),
    ],
)
def test_values_that_do_not_add_up_to_the_output_stop_the_run(
    tmp_path: Path, gap: float, message: str
) -> None:
    paths, _ = write_shards(tmp_path, ["0"], [3, 3])
    shard = pd.read_parquet(paths[0])
    shard.loc[1, "model_output"] += gap  # row_id 2 (ids are 0, 2, 4, ...)
    shard.to_parquet(paths[0], index=False)
    with pytest.raises(ExplainError, match=message):
        aggregate(paths, tmp_path / "values.parquet", FEATURES, ["mean_abs"])


def test_the_tolerance_is_relative_to_the_size_of_the_output(tmp_path: Path) -> None:
    paths, _ = write_shards(tmp_path, ["0"], [3])
    shard = pd.read_parquet(paths[0])
    shard["base_value"] += 1e6
    shard["model_output"] += 1e6 + 5.0  # 5 in a million: float32 rounding of a large regression output
    shard.to_parquet(paths[0], index=False)
    result = aggregate(paths, tmp_path / "values.parquet", FEATURES, ["mean_abs"], additivity_tolerance=1e-5)
    assert result.additivity_max_error == pytest.approx(5.0)
    with pytest.raises(ExplainError, match="explainer.additivity_tolerance 1e-06"):
        aggregate(paths, tmp_path / "values2.parquet", FEATURES, ["mean_abs"], additivity_tolerance=1e-6)
