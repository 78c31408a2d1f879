"""The plan's choices where the data decides them: columns shap's tree explainer cannot read, and the storage
of text columns a kernel run gives the model."""

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


def _penguins_plan(
    penguins: tuple[Path, Path], write_config: Callable[..., Path], model_path: Path
) -> RunPlan:
    config = load_config(
        write_config(
            model={"name": "penguins", "kind": "sklearn", "path": str(model_path), "class_index": 1},
            data={"source": str(penguins[0]), "target": "species", "explain_rows": 3},
            background={"size": 10},
            explainer={"algorithm": "kernel", "nsamples": 60, "seed": 1},
        )
    )
    return plan_run(config, check_data(config))


def _storages(frame: pd.DataFrame) -> dict[str, str]:
    return {str(c): t.storage for c, t in frame.dtypes.items() if isinstance(t, pd.StringDtype)}


def test_a_pipeline_is_given_its_text_as_python_strings_with_the_same_values(
    penguins: tuple[Path, Path], write_config: Callable[..., Path]
) -> None:
    """pandas keeps text in pyarrow; a scikit-learn Pipeline turns it into Python objects on every call (a
    quarter of a penguins kernel call). The probe saw the same outputs both ways, so the plan's rows and
    background hold Python strings, and every value is the one the data's own storage gives, bit for bit."""
    from shapline.tasks.data.background import Background
    from shapline.tasks.explainers.explain import explain_rows
    from shapline.tasks.models.predictors import LocalPredictor

    plan = _penguins_plan(penguins, write_config, penguins[1])
    assert plan.python_text == ["island", "sex"]
    assert _storages(plan.rows) == _storages(plan.background.frame) == {"island": "python", "sex": "python"}
    data = pd.read_csv(penguins[0])
    assert _storages(data) == {"species": "pyarrow", "island": "pyarrow", "sex": "pyarrow"}
    arrow_rows = data.loc[plan.rows.index, plan.rows.columns]
    arrow_background = Background(frame=data.loc[plan.background.frame.index, plan.rows.columns])
    config = load_config(
        write_config(
            model={"name": "p", "kind": "sklearn", "path": str(penguins[1])},
            data={"source": str(penguins[0])},
            explainer={"algorithm": "kernel", "nsamples": 60, "seed": 1},
        )
    ).explainer
    predictor = LocalPredictor("p", joblib.load(penguins[1]), "predict_proba")
    python = explain_rows(plan.rows, plan.background, predictor, config, "logit", 1, algorithm="kernel")
    predictor = LocalPredictor("p", joblib.load(penguins[1]), "predict_proba")
    arrow = explain_rows(arrow_rows, arrow_background, predictor, config, "logit", 1, algorithm="kernel")
    np.testing.assert_array_equal(python.values, arrow.values)
    np.testing.assert_array_equal(python.model_output, arrow.model_output)


def test_a_model_that_tells_the_storages_apart_keeps_the_datas_own(
    penguins: tuple[Path, Path], write_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Only a scikit-learn model whose outputs on the probe rows are the same bit for bit both ways gets
    Python strings: a model of its own keeps the data's storage, and so would one that tells the storages
    apart or fails on either."""
    from shapline.tasks.models.predictors import LocalPredictor
    from shapline.tasks.models.probe import same_with_python_text
    from tests.helpers import StorageMinded

    path = tmp_path / "minded.joblib"
    pipeline = joblib.load(penguins[1])
    joblib.dump(StorageMinded(pipeline), path)
    plan = _penguins_plan(penguins, write_config, path)
    assert plan.python_text == []
    assert _storages(plan.rows) == _storages(plan.background.frame) == {"island": "pyarrow", "sex": "pyarrow"}

    probe = plan.probe
    assert same_with_python_text(
        LocalPredictor("p", pipeline, "predict_proba"), probe, pipeline.predict_proba(probe)
    )
    minded = LocalPredictor("m", StorageMinded(pipeline), "predict_proba")
    assert not same_with_python_text(minded, probe, minded.predict(probe))

    class ArrowOnly(StorageMinded):
        def predict_proba(self, rows: Any) -> Any:
            if any(isinstance(t, pd.StringDtype) and t.storage == "python" for t in rows.dtypes.to_numpy()):
                raise TypeError("expected pyarrow strings")
            return self.model.predict_proba(rows)

    arrow_only = LocalPredictor("a", ArrowOnly(pipeline), "predict_proba")
    assert not same_with_python_text(arrow_only, probe, arrow_only.predict(probe))
