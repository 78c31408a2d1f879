"""What each category does: categories.csv against a groupby written here, from staged rows, and its plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shapline.tasks.common.config import OutputConfig
from shapline.tasks.compute.shards import plan_shards
from shapline.tasks.compute.staging import stage_rows
from shapline.tasks.explainers.explain import ShardValues
from shapline.tasks.results import categories
from shapline.tasks.results.categories import category_effects, write_categories

FEATURES = ["mins", "state", "vip"]


def values_and_rows(tmp_path: Path, labels: list[str], n: int = 60) -> tuple[Path, pd.DataFrame]:
    rng = np.random.default_rng(0)
    rows = pd.DataFrame(
        {
            "mins": rng.normal(size=n),
            "state": rng.choice(["KS", "OH", None], size=n),
            "vip": rng.choice([True, False], size=n),
        },
        index=pd.RangeIndex(100, 100 + n),  # row_ids are positions in the data, not 0..n
    )
    shard = ShardValues(
        row_ids=rows.index.to_numpy(),
        features=FEATURES,
        labels=labels,
        values=rng.normal(size=(n, len(FEATURES), len(labels))),
        base_values=np.zeros((n, len(labels))),
        model_output=rng.normal(size=(n, len(labels))),
        algorithm="kernel",
        link="logit",
    )
    path = tmp_path / "shap_values.parquet"
    shard.to_table().to_pandas().to_parquet(path, index=False)
    return path, rows


@pytest.mark.parametrize("labels", [["1"], ["no", "yes"]])
def test_each_category_is_its_rows_mean_shap_value_and_count_per_class(
    tmp_path: Path, labels: list[str]
) -> None:
    path, rows = values_and_rows(tmp_path, labels)
    # From the staged shards, as the flow has them once it let go of the data.
    staged = stage_rows(rows, plan_shards(rows.index.to_numpy(), 25), tmp_path / "rows")
    table = category_effects(path, staged, FEATURES, labels)
    several = len(labels) > 1
    assert list(table.columns) == [
        "feature",
        *(["class"] if several else []),
        "category",
        "count",
        "mean_shap_value",
    ]
    assert set(table["feature"]) == {"state", "vip"}  # text and booleans; numbers have their High/Low colours
    values = pd.read_parquet(path)
    for label in labels:
        mine = values[values["class"] == label] if several else values
        data = rows.loc[mine["row_id"]]
        for feature in ("state", "vip"):
            names = data[feature].astype(object).where(data[feature].notna(), "(missing)").astype(str)
            expected = mine[feature].groupby(names.to_numpy()).agg(["size", "mean"])
            part = table[(table["feature"] == feature) & ((table["class"] == label) if several else True)]
            got = part.set_index("category")
            assert got["count"].to_dict() == expected["size"].to_dict()
            assert got["mean_shap_value"].to_dict() == pytest.approx(expected["mean"].to_dict(), abs=1e-12)
            assert part["mean_shap_value"].is_monotonic_decreasing
    assert "(missing)" in set(table["category"]) and {"True", "False"} <= set(table["category"])


def test_a_feature_with_many_values_keeps_the_most_frequent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(categories, "MAX_CATEGORIES", 1)
    path, rows = values_and_rows(tmp_path, ["1"])
    table = category_effects(path, rows, FEATURES, ["1"])
    state = table[table["feature"] == "state"]
    most = rows["state"].astype(object).where(rows["state"].notna(), "(missing)").value_counts().index[0]
    assert set(state["category"]) == {str(most), "(other: 2 values)"} and state["count"].sum() == len(rows)


def test_the_table_and_the_plot_are_written_only_for_runs_with_categories(tmp_path: Path) -> None:
    path, rows = values_and_rows(tmp_path, ["no", "yes"])
    written = write_categories(path, rows, FEATURES, ["no", "yes"], OutputConfig(), tmp_path, None, "churn")
    assert (tmp_path / "categories.csv").is_file() and len(written) == len(
        pd.read_csv(tmp_path / "categories.csv")
    )
    assert (tmp_path / "plots" / "categories.png").stat().st_size > 10_000
    numbers = tmp_path / "numbers"
    numbers.mkdir()
    nothing = write_categories(path, rows, ["mins"], ["no", "yes"], OutputConfig(), numbers)
    assert nothing.empty and list(numbers.iterdir()) == []
    without_plot = tmp_path / "no-plot"
    without_plot.mkdir()
    write_categories(path, rows, FEATURES, ["no", "yes"], OutputConfig(plots=["bar"]), without_plot)
    assert [p.name for p in without_plot.iterdir()] == ["categories.csv"]
