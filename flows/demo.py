"""The demo: real penguin measurements (shipped inside the palmerpenguins package), a model trained here."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import joblib

if TYPE_CHECKING:
    import pandas as pd
    from sklearn.pipeline import Pipeline

from shapline.tasks.common.config import SklearnModel, load_config
from shapline.tasks.common.errors import ConfigError

DEFAULT_CONFIG = "configs/penguins.yaml"
# The demo data's row identity (data.id_column): the same bird keeps its id in every file.
ID_COLUMN = "penguin_id"
# Next week's birds, for a second demo run that drifts: the Dream island only (no Gentoo lives there,
# every Chinstrap does), written beside the demo data.
DREAM_FILE = "penguins-dream.csv"


def penguins_with_ids() -> pd.DataFrame:
    """The palmerpenguins data with a penguin_id column (P001, P002, ...) in front."""
    from palmerpenguins import load_penguins

    data = load_penguins()
    data.insert(0, ID_COLUMN, [f"P{i + 1:03d}" for i in range(len(data))])
    return data


def train_penguin_model(data: pd.DataFrame) -> Pipeline:
    """A scikit-learn Pipeline that imputes, one-hot encodes the text columns and fits a logistic regression."""
    from sklearn.compose import make_column_selector, make_column_transformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    features = data.drop(columns=["species", ID_COLUMN], errors="ignore")
    encode = make_column_transformer(
        (
            make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore")),
            make_column_selector(dtype_exclude="number"),
        ),
        (
            make_pipeline(SimpleImputer(strategy="median"), StandardScaler()),
            make_column_selector(dtype_include="number"),
        ),
    )
    return make_pipeline(encode, LogisticRegression(C=0.3, max_iter=2000)).fit(features, data["species"])


def demo_config(config_path: str) -> tuple[str, list[str]]:
    """The demo's config: the given file, or (for the default path, when it is not there, as after a
    `pip install` outside a checkout) a copy of the one shipped inside the package, written there."""
    path = Path(config_path)
    if path.exists() or config_path != DEFAULT_CONFIG:
        return config_path, []
    shipped = resources.files("shapline.configs").joinpath("penguins.yaml").read_text()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(shipped)
    return config_path, [f"demo config: the one shipped with shapline -> {path}"]


def prepare_demo(config_path: str) -> list[str]:
    """Write the penguins CSV and a trained model where the demo config's data.source and model.path point."""
    config = load_config(config_path)
    if not isinstance(config.model, SklearnModel):
        raise ConfigError(f"{config_path}: the demo trains a scikit-learn model: model.kind must be sklearn")
    data = penguins_with_ids()
    data_path, model_path = Path(config.data.source), Path(config.model.path)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    dream = data_path.parent / DREAM_FILE
    if data_path.name != DREAM_FILE:
        data.to_csv(data_path, index=False)
    data[data["island"] == "Dream"].to_csv(dream, index=False)
    joblib.dump(train_penguin_model(data), model_path)
    return [
        f"demo data: {len(data)} penguins with {data.shape[1]} columns (text, numbers, missing values) -> {data_path}",
        f"next week's birds (Dream island only, for a second run that drifts) -> {dream}",
        f"demo model: scikit-learn Pipeline(impute, one-hot, logistic regression) -> {model_path}",
    ]
