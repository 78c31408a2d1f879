from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from shapline.tasks.common.config import BackgroundConfig
from shapline.tasks.common.errors import DataError
from shapline.tasks.data.background import WEIGHT_COLUMN, draw_background


@pytest.fixture
def features() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"a": rng.normal(size=200), "b": rng.integers(0, 5, size=200).astype(float)})


@pytest.fixture
def target() -> pd.Series:
    return pd.Series(["yes"] * 20 + ["no"] * 180)


def test_random_is_seeded_and_sized(features: pd.DataFrame) -> None:
    first = draw_background(features, None, BackgroundConfig(method="random", size=50, seed=1))
    again = draw_background(features, None, BackgroundConfig(method="random", size=50, seed=1))
    other = draw_background(features, None, BackgroundConfig(method="random", size=50, seed=2))
    assert len(first.frame) == 50 and first.weights is None
    pd.testing.assert_frame_equal(first.frame, again.frame)
    assert not first.frame.equals(other.frame)


def test_all_and_oversized_samples_keep_every_row(features: pd.DataFrame) -> None:
    assert len(draw_background(features, None, BackgroundConfig(method="all")).frame) == 200
    assert len(draw_background(features, None, BackgroundConfig(method="random", size=500)).frame) == 200


def test_kmeans_gives_weighted_centres_snapped_to_observed_values(features: pd.DataFrame) -> None:
    background = draw_background(features, None, BackgroundConfig(method="kmeans", size=8, seed=0))
    assert len(background.frame) == 8
    assert background.weights is not None and background.weights.sum() == pytest.approx(1.0)
    assert set(background.frame["b"]) <= set(features["b"])
    logged = background.to_frame()  # background.parquet: the centres and their weights
    assert list(logged.columns) == [*features.columns, WEIGHT_COLUMN]
    np.testing.assert_allclose(logged[WEIGHT_COLUMN], background.weights)


def test_kmeans_names_the_non_numeric_columns(features: pd.DataFrame) -> None:
    mixed = features.assign(state=["KS"] * 200, plan=["x"] * 200)
    with pytest.raises(DataError, match="kmeans needs numeric features; non-numeric columns: state, plan"):
        draw_background(mixed, None, BackgroundConfig(method="kmeans", size=5))


def test_stratified_keeps_class_shares(features: pd.DataFrame, target: pd.Series) -> None:
    background = draw_background(features, target, BackgroundConfig(method="stratified", size=50, seed=0))
    shares = target.loc[background.frame.index].value_counts()
    assert len(background.frame) == 50
    assert shares["yes"] == 5 and shares["no"] == 45


def test_stratified_without_target_is_an_error(features: pd.DataFrame) -> None:
    with pytest.raises(DataError, match="needs data.target"):
        draw_background(features, None, BackgroundConfig(method="stratified", size=5))


def test_empty_data_is_an_error() -> None:
    with pytest.raises(DataError, match="no rows"):
        draw_background(pd.DataFrame({"a": []}), None, BackgroundConfig())


def test_stratified_refuses_a_target_with_more_values_than_background_rows(features: pd.DataFrame) -> None:
    continuous = pd.Series(np.arange(200.0), name="price")
    with pytest.raises(
        DataError, match=r"data\.target 'price' has 200 distinct values, more than background\.size 10"
    ):
        draw_background(features, continuous, BackgroundConfig(method="stratified", size=10))


def test_stratified_gives_exactly_size_rows_when_rare_classes_round_up(features: pd.DataFrame) -> None:
    # Nine classes of one row and one of 191: each rare class is owed 0.05 rows of 10 and gets one.
    target = pd.Series([f"rare{i}" for i in range(9)] + ["common"] * 191)
    background = draw_background(features, target, BackgroundConfig(method="stratified", size=10, seed=0))
    assert len(background.frame) == 10
    drawn = target.loc[background.frame.index]
    assert set(drawn) == set(target)  # every class kept its row
