"""The shard store keeps a kernel shard's coalitions and standard errors with its values, or neither."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shapline.tasks.compute.shards import Shard, ShardStore
from shapline.tasks.explainers.explain import ShardValues
from shapline.tasks.results.aggregate import ERRORS_FILE, aggregate


def shard_values(index: int, rows: int, labels: list[str], errors: bool) -> ShardValues:
    rng = np.random.default_rng(index)
    values = rng.normal(size=(rows, 3, len(labels)))
    base = np.full((rows, len(labels)), 0.25)
    return ShardValues(
        row_ids=np.arange(index * rows, (index + 1) * rows),
        features=["a", "b", "c"],
        labels=labels,
        values=values,
        base_values=base,
        model_output=base + values.sum(axis=1),
        algorithm="kernel",
        link="identity",
        coalitions=np.full(rows, 100 + index),
        standard_errors=np.abs(rng.normal(size=values.shape)) / 10 if errors else None,
        converged=np.array([True] * (rows - 1) + [False]) if errors else None,
        model_rows=rows * (100 + index) * 10,
    )


@pytest.mark.parametrize("labels", [["1"], ["no", "yes"]])
def test_standard_errors_travel_with_the_shard_and_end_beside_the_values(
    tmp_path: Path, labels: list[str]
) -> None:
    store = ShardStore(tmp_path / "store")
    store.folder.mkdir()
    written = [store.write(i, shard_values(i, 4, labels, errors=True)) for i in range(3)]
    found = [store.finished(Shard(i, np.arange(i * 4, (i + 1) * 4))) for i in range(3)]
    assert all(
        f is not None and f.errors_path == w.errors_path and f.model_rows == w.model_rows
        for f, w in zip(found, written, strict=True)
    )
    names = pd.Series([f"id{i}" for i in range(12)])
    combined = aggregate(
        [w.path for w in written],
        tmp_path / "shap_values.parquet",
        ["a", "b", "c"],
        ["mean_abs"],
        names,
        "id",
        errors_paths=[w.errors_path for w in written],
        model_rows=sum(w.model_rows for w in written),
    )
    accuracy = combined.accuracy
    assert accuracy is not None and accuracy.errors_path == str(tmp_path / ERRORS_FILE)
    errors = pd.read_parquet(accuracy.errors_path)
    values = pd.read_parquet(tmp_path / "shap_values.parquet")
    several = len(labels) > 1
    expected = ["row_id", "id", *(["class"] if several else []), "a", "b", "c", "coalitions", "converged"]
    assert list(errors.columns) == expected
    assert (
        errors["row_id"].tolist() == values["row_id"].tolist()
        and errors["id"].tolist() == values["id"].tolist()
    )
    assert accuracy.coalitions.tolist() == [100] * 4 + [101] * 4 + [102] * 4
    assert accuracy.rows_unconverged == 3 and accuracy.unconverged == ["id3", "id7", "id11"]
    assert accuracy.model_rows == sum(w.model_rows for w in written)
    assert accuracy.max_standard_error == pytest.approx(float(errors[["a", "b", "c"]].to_numpy().max()))
    importance = combined.importance
    assert "mean_abs_se" in importance.columns
    part = errors if not several else errors[errors["class"] == labels[0]]
    first = importance[importance["feature"] == "a"]
    first = first if not several else first[first["class"] == labels[0]]
    assert float(first["mean_abs_se"].iloc[0]) == pytest.approx(np.sqrt((part["a"] ** 2).sum()) / len(part))


def test_a_shard_whose_standard_errors_are_lost_is_computed_again(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "store")
    store.folder.mkdir()
    written = store.write(0, shard_values(0, 4, ["1"], errors=True))
    assert written.errors_path is not None
    Path(written.errors_path).unlink()
    assert store.finished(Shard(0, np.arange(4))) is None
    assert not Path(written.path).exists() and "cannot be read" in store.discarded[0]


def test_shaps_estimator_keeps_its_coalitions_without_a_standard_errors_table(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "store")
    store.folder.mkdir()
    written = [store.write(i, shard_values(i, 3, ["1"], errors=False)) for i in range(2)]
    combined = aggregate(
        [w.path for w in written],
        tmp_path / "shap_values.parquet",
        ["a", "b", "c"],
        ["mean_abs"],
        errors_paths=[w.errors_path for w in written],
        model_rows=7,
    )
    assert combined.accuracy is not None and combined.accuracy.errors_path is None
    assert combined.accuracy.coalitions_per_row() == 100.5 and combined.accuracy.rows_unconverged == 0
    assert not (tmp_path / ERRORS_FILE).exists() and "mean_abs_se" not in combined.importance.columns
