"""Models from a real (sqlite) MLflow registry load as Predictors and name the exact version explained."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import xgboost
from mlflow import MlflowClient
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from shapline.tasks.common.config import MlflowModel
from shapline.tasks.common.errors import ModelError
from shapline.tasks.explainers.choice import resolve_explainer
from shapline.tasks.models.loading import load_predictor
from shapline.tasks.models.predictors import BoosterPredictor, LocalPredictor
from shapline.tasks.models.registry import (
    PyfuncPredictor,
    load_registry_predictor,
    parse_model_uri,
    resolve_registry_model,
)

# skops refuses tree internals unless the producer vouches for them; a real producer does the same.
TREE_TYPES = ["sklearn.tree._tree.Tree"]


class Doubler(mlflow.pyfunc.PythonModel):
    """A pyfunc-only model: no native flavor for shap to read."""

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> np.ndarray:
        return 2.0 * model_input.to_numpy(dtype=float).sum(axis=1)


@dataclass(frozen=True)
class Store:
    uri: str
    rows: pd.DataFrame
    forest: RandomForestClassifier
    boosted: GradientBoostingClassifier
    linear: LogisticRegression
    forest_run_id: str
    boosted_run_id: str
    doubler_run_id: str
    booster: Any


def _log(experiment_id: str, model: Any, registered: str | None, rows: pd.DataFrame, **options: Any) -> str:
    # Declared requirements skip MLflow inferring them in a subprocess, seconds per model.
    options.setdefault("pip_requirements", ["scikit-learn"])
    with mlflow.start_run(experiment_id=experiment_id) as run:
        if isinstance(model, mlflow.pyfunc.PythonModel):
            mlflow.pyfunc.log_model(name="model", python_model=model, input_example=rows.iloc[:2], **options)
        elif isinstance(model, xgboost.Booster):
            mlflow.xgboost.log_model(model, name="model", registered_model_name=registered, **options)
        else:
            mlflow.sklearn.log_model(
                model, name="model", registered_model_name=registered, input_example=rows.iloc[:2], **options
            )
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """One registry for the module: rf v1 (champion) and v2, logreg v1, an unregistered pyfunc."""
    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder}/mlflow.db"
    features, target = load_breast_cancer(return_X_y=True, as_frame=True)
    features = features.iloc[:, :4]
    forest = RandomForestClassifier(n_estimators=10, max_depth=3, random_state=0).fit(features, target)
    boosted = GradientBoostingClassifier(n_estimators=10, max_depth=2, random_state=0).fit(features, target)
    linear = LogisticRegression(max_iter=2000).fit(features, target)
    booster = xgboost.train(
        {"objective": "binary:logistic", "max_depth": 2}, xgboost.DMatrix(features, label=target), 5
    )
    # The fluent logging API needs a global tracking URI; both it and the env var are put back after.
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        with _use_tracking_uri(uri):
            client = MlflowClient(uri)
            experiment_id = client.create_experiment(
                "models", artifact_location=(folder / "artifacts").as_uri()
            )
            forest_run = _log(experiment_id, forest, "rf", features, skops_trusted_types=TREE_TYPES)
            boosted_run = _log(experiment_id, boosted, "rf", features, skops_trusted_types=TREE_TYPES)
            _log(experiment_id, linear, "logreg", features)
            doubler_run = _log(experiment_id, Doubler(), None, features)
            _log(experiment_id, booster, "booster", features, pip_requirements=["xgboost"])
            client.set_registered_model_alias("rf", "champion", "1")
    return Store(
        uri, features.iloc[:20], forest, boosted, linear, forest_run, boosted_run, doubler_run, booster
    )


@pytest.fixture(autouse=True)
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """MLFLOW_TRACKING_URI names an empty store: a loader ignoring config.tracking_uri fails."""
    path = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return path


def _config(store: Store, uri: str, **extra: Any) -> MlflowModel:
    return MlflowModel(kind="mlflow", name="rf", uri=uri, tracking_uri=store.uri, **extra)


@pytest.mark.parametrize("uri", ["models:/rf/1", "models:/rf@champion"])
def test_tree_model_loads_native_by_version_and_alias(store: Store, elsewhere: Path, uri: str) -> None:
    predictor = load_registry_predictor(_config(store, uri))
    assert isinstance(predictor, LocalPredictor)
    assert isinstance(predictor.native, RandomForestClassifier)
    np.testing.assert_array_equal(predictor.predict(store.rows), store.forest.predict_proba(store.rows))
    assert predictor.feature_names == list(store.rows.columns)
    assert resolve_explainer("auto", predictor, "identity")[0] == "tree"
    assert not elsewhere.exists()


def test_latest_is_the_highest_version(store: Store) -> None:
    predictor = load_registry_predictor(_config(store, "models:/rf/latest"))
    np.testing.assert_array_equal(predictor.predict(store.rows), store.boosted.predict_proba(store.rows))


def test_linear_model_gets_the_linear_explainer(store: Store) -> None:
    predictor = load_registry_predictor(_config(store, "models:/logreg/1"))
    np.testing.assert_allclose(predictor.predict(store.rows), store.linear.predict_proba(store.rows))
    assert resolve_explainer("auto", predictor, "identity")[0] == "linear"


def test_run_uri_loads_and_finds_its_registered_version(store: Store) -> None:
    config = _config(store, f"runs:/{store.boosted_run_id}/model")
    predictor = load_registry_predictor(config)
    np.testing.assert_array_equal(predictor.predict(store.rows), store.boosted.predict_proba(store.rows))
    tags = resolve_registry_model(config).tags
    assert tags["shapline.model_name"] == "rf"
    assert tags["shapline.model_version"] == "2"
    assert tags["shapline.model_run_id"] == store.boosted_run_id


def test_identity_resolves_the_alias_to_its_version_and_run(store: Store) -> None:
    tags = resolve_registry_model(_config(store, "models:/rf@champion")).tags
    assert tags["shapline.model_uri"] == "models:/rf@champion"
    assert tags["shapline.model_name"] == "rf"
    assert tags["shapline.model_version"] == "1"
    assert tags["shapline.model_run_id"] == store.forest_run_id
    assert tags["shapline.model_id"].startswith("m-")


def test_xgboost_booster_loads_native(store: Store) -> None:
    predictor = load_registry_predictor(_config(store, "models:/booster/1"))
    assert isinstance(predictor, BoosterPredictor)
    positive = store.booster.predict(xgboost.DMatrix(store.rows))
    np.testing.assert_allclose(predictor.predict(store.rows)[:, 1], positive, rtol=1e-6)
    assert resolve_explainer("auto", predictor, "identity")[0] == "tree"


def test_pyfunc_only_model_is_explained_through_predict(store: Store) -> None:
    config = _config(store, f"runs:/{store.doubler_run_id}/model")
    predictor = load_registry_predictor(config)
    assert isinstance(predictor, PyfuncPredictor)
    expected = 2.0 * store.rows.to_numpy(dtype=float).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(predictor.predict(store.rows), expected)
    assert resolve_explainer("auto", predictor, "identity")[0] == "kernel"
    assert "shapline.model_version" not in resolve_registry_model(config).tags


def test_tracking_uri_defaults_to_the_environment(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    config = MlflowModel(kind="mlflow", name="rf", uri="models:/rf/1")
    assert resolve_registry_model(config).tags["shapline.model_version"] == "1"


def test_load_predictor_dispatches_mlflow_kind(store: Store) -> None:
    predictor = load_predictor(_config(store, "models:/rf@champion"))
    np.testing.assert_array_equal(predictor.predict(store.rows), store.forest.predict_proba(store.rows))


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("models:/rf/9", "registered model 'rf' has no version 9 (versions: 1, 2)"),
        ("models:/rf@gone", "registered model 'rf' has no alias 'gone' (aliases: champion)"),
        ("models:/nope/1", "no registered model named 'nope'"),
        ("runs:/0123456789abcdef0123456789abcdef/model", "no run 0123456789abcdef0123456789abcdef"),
        ("runs:/{forest_run_id}/elsewhere", "cannot download the model's files"),
    ],
)
def test_missing_model_names_the_uri(store: Store, uri: str, expected: str) -> None:
    uri = uri.format(forest_run_id=store.forest_run_id)
    with pytest.raises(ModelError, match="^model.uri: ") as error:
        load_registry_predictor(_config(store, uri))
    message = str(error.value)
    assert uri in message
    assert expected in message
    assert "\n" not in message


def test_pyfunc_refuses_an_output_it_cannot_give(store: Store) -> None:
    config = _config(store, f"runs:/{store.doubler_run_id}/model", output="predict_proba")
    with pytest.raises(ModelError, match="model.output: predict_proba is not available"):
        load_registry_predictor(config)


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("models:/rf/3", ("version", "rf", "3")),
        ("models:/rf@champion", ("alias", "rf", "champion")),
        ("models:/team.rf/latest", ("version", "team.rf", "latest")),
        ("runs:/abc/model", ("run", "abc", "model")),
        ("runs:/abc/nested/model/", ("run", "abc", "nested/model")),
        ("models:/m-0123456789abcdef0123456789abcdef", ("logged", "m-0123456789abcdef0123456789abcdef", "")),
    ],
)
def test_parse_model_uri(uri: str, parsed: tuple[str, str, str]) -> None:
    assert parse_model_uri(uri) == parsed


@pytest.mark.parametrize(
    "uri",
    ["rf/3", "models:/", "models:/rf", "models:/rf/Production", "runs:/abc", "s3://b/model", "models://x/1"],
)
def test_malformed_uri_is_refused(uri: str) -> None:
    with pytest.raises(ModelError, match="model.uri: "):
        parse_model_uri(uri)


@pytest.fixture(scope="module")
def classifier_uris(store: Store, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An XGBClassifier in the registry as users log one: with the xgboost flavour and the sklearn one."""
    model = xgboost.XGBClassifier(n_estimators=5, max_depth=2, n_jobs=1).fit(
        store.rows, np.arange(len(store.rows)) % 2
    )
    folder = tmp_path_factory.mktemp("classifiers")
    with warnings.catch_warnings(), _use_tracking_uri(store.uri):
        warnings.simplefilter("ignore")
        experiment_id = MlflowClient(store.uri).create_experiment("classifiers", folder.as_uri())
        with mlflow.start_run(experiment_id=experiment_id):
            mlflow.xgboost.log_model(
                model, name="xgb", registered_model_name="xgb-xgboost", pip_requirements=["xgboost"]
            )
            mlflow.sklearn.log_model(
                model,
                name="sk",
                registered_model_name="xgb-sklearn",
                serialization_format="cloudpickle",
                pip_requirements=["xgboost"],
            )
    return {
        "booster": "models:/booster/1",
        "xgboost": "models:/xgb-xgboost/1",
        "sklearn": "models:/xgb-sklearn/1",
    }


@pytest.mark.parametrize("logged", ["booster", "xgboost", "sklearn"])
def test_xgboost_in_the_registry_predicts_in_place(
    store: Store, classifier_uris: dict[str, str], logged: str, dmatrices: list[int]
) -> None:
    """Every flavour an XGBoost model is logged with reaches the booster in place: no DMatrix per call."""
    predictor = load_registry_predictor(_config(store, classifier_uris[logged]))
    assert isinstance(predictor, BoosterPredictor if logged == "booster" else LocalPredictor)
    assert predictor.reads_rows  # the kernel engine writes its calls row-major, as XGBoost reads them fastest
    dmatrices.clear()
    outputs = predictor.predict(store.rows)
    assert dmatrices == [] and outputs.shape == (len(store.rows), 2)
    # The engine's row-major calls are handed over as the array it wrote, no frame around them.
    assert predictor.takes_array(list(store.rows.columns))
    array = np.ascontiguousarray(store.rows, dtype=np.float32)
    assert np.array_equal(predictor.predict_outputs(array, [1], 2), outputs[:, [1]])
    assert dmatrices == []
