"""The plan's choice of explainer where the data decides it: columns shap's tree explainer cannot read."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer

from shapline.tasks.common.config import load_config
from shapline.tasks.common.errors import ExplainError
from shapline.tasks.compute.plan import RunPlan, check_data, plan_run


@pytest.fixture(scope="module")
def graded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Breast cancer's first four columns and a category column (with missing values), as Parquet."""
    folder = tmp_path_factory.mktemp("graded")
    bunch = load_breast_cancer(as_frame=True)
    features = bunch.data.iloc[:, :4].copy()
    rng = np.random.default_rng(0)
    features["grade"] = pd.Categorical(rng.choice(["a", "b", "c"], len(features)))
    features.loc[rng.random(len(features)) < 0.1, "grade"] = np.nan
    features.assign(malignant=bunch.target).to_parquet(folder / "graded.parquet")
    return folder


def _plan(
    write_config: Callable[..., Path], folder: Path, model: dict[str, Any], **explainer: Any
) -> RunPlan:
    config = load_config(
        write_config(
            model=model,
            data={"source": str(folder / "graded.parquet"), "target": "malignant", "explain_rows": 4},
            background={"size": 10},
            explainer=explainer,
        )
    )
    return plan_run(config, check_data(config))


def test_a_tree_model_shap_reads_as_numbers_is_explained_with_kernel_under_auto(
    graded: Path, write_config: Callable[..., Path]
) -> None:
    """scikit-learn's HistGradientBoosting reads the category column itself; shap's TreeExplainer hands it an
    array of numbers, and every shard stopped on casting 'c' to a float. auto explains it with kernel (which
    passes every column to the model untouched) and says why; tree asked for is refused in one line."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    frame = pd.read_parquet(graded / "graded.parquet")
    model = HistGradientBoostingClassifier(max_iter=10, categorical_features="from_dtype")
    joblib.dump(model.fit(frame.drop(columns="malignant"), frame["malignant"]), graded / "hgb.joblib")
    section = {"name": "hgb", "kind": "sklearn", "path": str(graded / "hgb.joblib")}
    plan = _plan(write_config, graded, section)
    assert (plan.algorithm, plan.link) == ("kernel", "logit")
    assert plan.algorithm_said == (
        "explainer.algorithm auto: kernel, not tree (shap's TreeExplainer reads only numbers for "
        "HistGradientBoostingClassifier; non-numeric: grade)"
    )
    with pytest.raises(
        ExplainError, match=r"^explainer\.algorithm tree: .* non-numeric: grade; use explainer"
    ):
        _plan(write_config, graded, section, algorithm="tree")


def test_xgboost_reads_its_categories_under_tree_path_dependent_only(
    graded: Path, write_config: Callable[..., Path]
) -> None:
    import xgboost

    frame = pd.read_parquet(graded / "graded.parquet")
    model = xgboost.XGBClassifier(n_estimators=5, max_depth=2, enable_categorical=True, tree_method="hist")
    model.fit(frame.drop(columns="malignant"), frame["malignant"])
    model.save_model(graded / "xgb.json")
    section = {"name": "xgb", "kind": "xgboost", "path": str(graded / "xgb.json")}
    plan = _plan(write_config, graded, section)
    assert plan.algorithm == "tree" and plan.algorithm_said is None
    with pytest.raises(ExplainError, match=r"^explainer\.feature_perturbation interventional: .* grade"):
        _plan(write_config, graded, section, feature_perturbation="interventional")
