from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.aggregate import aggregate
from tasks.explain import ShardValues
from tasks.schemas import SchemaError, check_columns, importance_columns, values_columns

FEATURES = ["a", "b", "c"]


def write_shards(
    tmp_path: Path, labels: list[str], sizes: list[int], seed: int = 0
) -> tuple[list[str], pd.DataFrame]:
    rng = np.random.default_rng(seed)
    paths, frames, start = [], [], 0
    for index, size in enumerate(sizes):
        values = rng.normal(size=(size, len(FEATURES), len(labels)))
        base = np.full((size, len(labels)), 0.5)
        shard = ShardValues(
            row_ids=np.arange(start, start + size) * 2,
            features=FEATURES,
            labels=labels,
            values=values,
            base_values=base,
            model_output=base + values.sum(axis=1) + 1e-3 * index,
            algorithm="kernel",
            link="identity",
        )
        frame = shard.to_frame()
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


def test_out_of_order_shards_are_refused(tmp_path: Path) -> None:
    paths, _ = write_shards(tmp_path, ["0"], [2, 2])
    with pytest.raises(ValueError, match="out of order"):
        aggregate(list(reversed(paths)), tmp_path / "values.parquet", FEATURES, ["mean_abs"])


def test_schema_check_names_the_table() -> None:
    with pytest.raises(SchemaError, match="shap_values.parquet: expected columns"):
        check_columns(pd.DataFrame({"x": [1]}), values_columns(FEATURES, False), "shap_values.parquet")
