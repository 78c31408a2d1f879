"""Load the configured model, whatever its kind, as a Predictor; what identifies it and its output space."""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import joblib

from shapline.tasks.config import MlflowModel, ModelConfig, SageMakerModel, SklearnModel, XGBoostModel
from shapline.tasks.endpoint import SageMakerPredictor
from shapline.tasks.errors import ModelError
from shapline.tasks.predictors import BoosterPredictor, LocalPredictor, Predictor, final_estimator, is_xgboost
from shapline.tasks.registry import load_registry_predictor
from shapline.tasks.sources import file_sha256


def _load_pickled(path: Path, name: str) -> Any:
    try:
        return joblib.load(path)
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ModelError(
            f"model.path: {path}: not a joblib/pickle model file ({type(exc).__name__})"
        ) from exc
    except ModuleNotFoundError as exc:
        raise ModelError(
            f"model.path: {path}: model {name} needs module {exc.name!r}, which is not installed"
        ) from exc


def load_predictor(config: ModelConfig) -> Predictor:
    """Load the configured model as a Predictor, once per process (a model file again only when it changed)."""
    mtime_ns = None
    if isinstance(config, SklearnModel | XGBoostModel):
        path = Path(config.path)
        if not path.is_file():
            raise ModelError(f"model.path: file not found: {path}")
        mtime_ns = os.stat(path).st_mtime_ns
    return _load_cached(config.model_dump_json(), mtime_ns)


def _parse_model_config(config_json: str) -> ModelConfig:
    from pydantic import TypeAdapter

    adapter: TypeAdapter[ModelConfig] = TypeAdapter(ModelConfig)
    return adapter.validate_json(config_json)


@functools.lru_cache(maxsize=8)
def _load_cached(config_json: str, mtime_ns: int | None) -> Predictor:
    """Cached by the config (as JSON: hashable) and a model file's mtime, so a changed file loads anew.

    The one place each model kind meets its loader: a new kind is a config class and a case here.
    """
    config = _parse_model_config(config_json)
    predictor: Predictor
    match config:
        case SageMakerModel():
            predictor = SageMakerPredictor(config)
        case MlflowModel():
            predictor = load_registry_predictor(config)
        case SklearnModel() | XGBoostModel():
            predictor = _load_file(config)
    if config.class_labels is not None:
        # The config names the classes where the model cannot (an endpoint answers numbers only).
        predictor.class_labels = list(config.class_labels)
    return predictor


def _load_file(config: SklearnModel | XGBoostModel) -> Predictor:
    path = Path(config.path)
    method = config.effective_output
    if isinstance(config, XGBoostModel) and path.suffix.lower() in (".json", ".ubj"):
        import xgboost

        booster = xgboost.Booster()
        try:
            booster.load_model(str(path))
        except xgboost.core.XGBoostError as exc:
            raise ModelError(
                f"model.path: {path}: not an XGBoost model ({str(exc).splitlines()[0]})"
            ) from exc
        return BoosterPredictor(config.name, booster, method)
    model = _load_pickled(path, config.name)
    if isinstance(config, XGBoostModel) and not is_xgboost(final_estimator(model)):
        raise ModelError(f"model.kind: xgboost, but {path} holds a {type(model).__name__}")
    if isinstance(config, SklearnModel) and not hasattr(model, "fit"):
        raise ModelError(f"model.kind: sklearn, but {path} holds a {type(model).__name__}, not an estimator")
    return LocalPredictor(config.name, model, method)


def link_for(predictor: Predictor, configured: str | None, default: str, wanted_method: str) -> str:
    """The link to explain in: the configured one, else the default unless the model cannot give probabilities."""
    if configured is not None:
        return configured
    # A generic pyfunc answers predict() even when predict_proba was the default: its output is no probability.
    return default if predictor.method == wanted_method else "identity"


def model_fingerprint(config: ModelConfig) -> str:
    """What identifies the model's behaviour: a model file's bytes, else its (pinned) URI or endpoint."""
    if isinstance(config, SklearnModel | XGBoostModel):
        return file_sha256(config.path)
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()
