"""Load the configured model, whatever its kind, as a Predictor; what identifies it and its output space."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import threading
from pathlib import Path
from typing import Any

import joblib

from shapline.tasks.common.config import MlflowModel, ModelConfig, SageMakerModel, SklearnModel, XGBoostModel
from shapline.tasks.common.errors import ModelError
from shapline.tasks.models.predictors import (
    BoosterPredictor,
    LocalPredictor,
    Predictor,
    final_estimator,
    is_xgboost,
)


def _load_pickled(content: bytes, path: Path, name: str) -> Any:
    try:
        return joblib.load(io.BytesIO(content))
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ModelError(
            f"model.path: {path}: not a joblib/pickle model file ({type(exc).__name__})"
        ) from exc
    except ModuleNotFoundError as exc:
        raise ModelError(
            f"model.path: {path}: model {name} needs module {exc.name!r}, which is not installed"
        ) from exc


def runs_code_when_loaded(config: ModelConfig) -> bool:
    """A pickled model file (joblib, pickle): unpickling runs whatever code the file holds.

    XGBoost's own .json/.ubj files are data, and an endpoint or registry URI loads nothing into this process
    from the config (a registry's pickle-based flavours are the registry's to trust).
    """
    if not isinstance(config, SklearnModel | XGBoostModel):
        return False
    return not (isinstance(config, XGBoostModel) and Path(config.path).suffix.lower() in XGBOOST_NATIVE)


def trusted_code_warning(config: ModelConfig) -> str | None:
    """The warning a run gives once for a model whose file runs code when loaded, else None."""
    if not runs_code_when_loaded(config):
        return None
    return (
        f"model.path {getattr(config, 'path', '')} is a pickle: loading it runs any code the file holds; "
        "load only files you trust (XGBoost's .json/.ubj and endpoints load no code)"
    )


XGBOOST_NATIVE = (".json", ".ubj")


def load_predictor(config: ModelConfig) -> Predictor:
    """Load the configured model as a Predictor, once per process (a model file again only when its bytes
    changed); a file whose sha256 is not model.sha256 (when set) is refused."""
    if not isinstance(config, SklearnModel | XGBoostModel):
        return _load_cached(config.model_dump_json(), None)
    path = Path(config.path)
    digest = _file_digest(path)
    if config.sha256 is not None and digest != config.sha256:
        raise ModelError(_changed(config, config.sha256, digest))
    return _load_cached(config.model_dump_json(), digest)


def _changed(config: SklearnModel | XGBoostModel, expected: str, digest: str) -> str:
    return (
        f"model.path: {config.path} changed: its sha256 is {digest[:12]}..., not the {expected[:12]}... "
        "this run started with (model.sha256); one run explains one model: run again once the file is final"
    )


# A file's digest by what the system says of it, so a shard does not read and hash a large model again
# while nothing changed; any write to the file changes its mtime (and usually its size or inode).
_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}
_DIGESTS_LOCK = threading.Lock()


def _stat_key(path: Path) -> tuple[str, int, int, int, int]:
    try:
        stat = os.stat(path)
    except FileNotFoundError as exc:
        raise ModelError(f"model.path: file not found: {path}") from exc
    return (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _file_digest(path: Path) -> str:
    key = _stat_key(path)
    with _DIGESTS_LOCK:
        known = _DIGESTS.get(key)
    return known if known is not None else _read_model_file(path)[1]


def _read_model_file(path: Path) -> tuple[bytes, str]:
    """The file's bytes and their sha256, read once: what is hashed is what is loaded."""
    key = _stat_key(path)
    if not path.is_file():
        raise ModelError(f"model.path: file not found: {path}")
    content = path.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    with _DIGESTS_LOCK:
        _DIGESTS[key] = digest
    return content, digest


def _parse_model_config(config_json: str) -> ModelConfig:
    from pydantic import TypeAdapter

    adapter: TypeAdapter[ModelConfig] = TypeAdapter(ModelConfig)
    return adapter.validate_json(config_json)


@functools.lru_cache(maxsize=8)
def _load_cached(config_json: str, digest: str | None) -> Predictor:
    """Cached by the config (as JSON: hashable) and a model file's sha256, so a changed file loads anew.

    The one place each model kind meets its loader: a new kind is a config class and a case here.
    """
    config = _parse_model_config(config_json)
    predictor: Predictor
    # Each kind's loader imports what only it needs (boto3, MLflow) when it is used.
    match config:
        case SageMakerModel():
            from shapline.tasks.models.sagemaker.endpoint import SageMakerPredictor

            predictor = SageMakerPredictor(config)
        case MlflowModel():
            from shapline.tasks.models.registry import load_registry_predictor

            predictor = load_registry_predictor(config)
        case SklearnModel() | XGBoostModel():
            predictor = _load_file(config, digest)
    if config.class_labels is not None:
        # The config names the classes where the model cannot (an endpoint answers numbers only).
        predictor.class_labels = list(config.class_labels)
    return predictor


def _load_file(config: SklearnModel | XGBoostModel, digest: str | None) -> Predictor:
    path = Path(config.path)
    content, read = _read_model_file(path)
    expected = config.sha256 or digest
    if expected is not None and read != expected:
        # Replaced between the check and this read: the bytes loaded must be the ones fingerprinted.
        raise ModelError(_changed(config, expected, read))
    method = config.effective_output
    if isinstance(config, XGBoostModel) and path.suffix.lower() in XGBOOST_NATIVE:
        import xgboost

        booster = xgboost.Booster()
        try:
            booster.load_model(bytearray(content))
        except xgboost.core.XGBoostError as exc:
            raise ModelError(
                f"model.path: {path}: not an XGBoost model ({str(exc).splitlines()[0]})"
            ) from exc
        return BoosterPredictor(config.name, booster, method)
    model = _load_pickled(content, path, config.name)
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
    """What identifies the model's behaviour: a model file's bytes (as pinned by model.sha256), else its
    (pinned) URI or endpoint."""
    if isinstance(config, SklearnModel | XGBoostModel):
        return config.sha256 or _file_digest(Path(config.path))
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()


def pin_model_file(config: ModelConfig) -> ModelConfig:
    """A model file's config with model.sha256 set to the file's bytes now (refused if the config pinned other
    bytes), so every load in the run (the flow's, each pool or Dask worker's) explains the same model."""
    if not isinstance(config, SklearnModel | XGBoostModel):
        return config
    digest = _file_digest(Path(config.path))
    if config.sha256 is not None and digest != config.sha256:
        raise ModelError(_changed(config, config.sha256, digest))
    return config.model_copy(update={"sha256": digest})
