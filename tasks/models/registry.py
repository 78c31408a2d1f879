"""Models in the MLflow registry or a run as Predictors, and tags naming exactly which model was explained."""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shapline.tasks.common.config import MlflowModel
from shapline.tasks.common.errors import ModelError, one_line
from shapline.tasks.common.redact import redact
from shapline.tasks.models.predictors import BoosterPredictor, LocalPredictor, Predictor, two_d
from shapline.tasks.tracking.uris import resolve_tracking_uri

_EXPECTED = (
    "expected models:/<name>/<version>, models:/<name>@<alias>, models:/<name>/latest, "
    "models:/<model_id> or runs:/<run_id>/<path>"
)
_ALIAS = re.compile(r"[\w-]+")
_LOGGED_MODEL_ID = re.compile(r"m-[0-9a-f]{32}")

# Flavors whose in-process model object shap's tree and linear explainers can read, in order of preference.
NATIVE_FLAVORS = ("sklearn", "xgboost", "lightgbm")


@dataclass(frozen=True)
class RegistryModel:
    """The one concrete model behind a configured URI: where its files are and where it came from."""

    uri: str
    location: str
    tracking_uri: str
    run_id: str | None = None
    name: str | None = None
    version: str | None = None
    model_id: str | None = None

    @property
    def pinned_uri(self) -> str:
        """models:/<name>/<version> when registered (an alias resolved once), else the configured URI."""
        if self.name is not None and self.version is not None:
            return f"models:/{self.name}/{self.version}"
        return self.uri

    @property
    def tags(self) -> dict[str, str]:
        """MLflow run tags naming the model, so runs and models can be found from each other."""
        tags = {
            "shapline.model_uri": self.uri,
            "shapline.model_name": self.name,
            "shapline.model_version": self.version,
            "shapline.model_run_id": self.run_id,
            "shapline.model_id": self.model_id,
        }
        return {key: value for key, value in tags.items() if value}


class PyfuncPredictor(Predictor):
    """An MLflow model with no native flavor: a model-agnostic explainer explains its pyfunc predict()."""

    def __init__(self, name: str, model: Any) -> None:
        self.name = name
        self.model = model
        self.method = "predict"
        schema = model.metadata.get_input_schema()
        if schema is not None and schema.has_input_names():
            self.feature_names = [str(n) for n in schema.input_names()]

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        output = self.model.predict(frame)
        if isinstance(output, (pd.DataFrame, pd.Series)):
            output = output.to_numpy()
        return two_d(output)


def _bad_uri(uri: str) -> ModelError:
    return ModelError(f"model.uri: {uri!r}: {_EXPECTED}")


def parse_model_uri(uri: str) -> tuple[str, str, str]:
    """('version'|'alias', name, version|alias), ('logged', model_id, '') or ('run', run_id, path)."""
    scheme, sep, rest = uri.partition(":/")
    rest = rest.rstrip("/")
    if not sep or rest.startswith("/") or not rest:
        raise _bad_uri(uri)
    if scheme == "runs":
        run_id, _, path = rest.partition("/")
        if not run_id or not path:
            raise _bad_uri(uri)
        return "run", run_id, path
    if scheme != "models":
        raise _bad_uri(uri)
    if "@" in rest and "/" not in rest.rsplit("@", 1)[1]:
        name, alias = rest.rsplit("@", 1)
        if not name or not _ALIAS.fullmatch(alias):
            raise _bad_uri(uri)
        return "alias", name, alias
    if "/" not in rest:
        if not _LOGGED_MODEL_ID.fullmatch(rest):
            raise _bad_uri(uri)
        return "logged", rest, ""
    name, version = rest.rsplit("/", 1)
    if not name or not (version.isdigit() or version == "latest"):
        raise ModelError(
            f"model.uri: {uri}: {version!r} is not a version number or 'latest' "
            "(stages are deprecated in MLflow; use an alias: models:/<name>@<alias>)"
        )
    return "version", name, version


def _client(config: MlflowModel) -> tuple[Any, str]:
    from mlflow import MlflowClient

    tracking_uri = resolve_tracking_uri(config.tracking_uri)
    # A configured URI names one server for both; otherwise MLflow's own variables decide, as in mlflow.
    registry_uri = config.tracking_uri or os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri), tracking_uri


def _is_missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _versions(client: Any, name: str) -> list[Any]:
    found = client.search_model_versions(f"name = '{name}'")
    return sorted(found, key=lambda v: int(v.version))


def _registered_model(client: Any, uri: str, name: str, tracking_uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if _is_missing(exc):
            raise ModelError(
                f"model.uri: {uri}: no registered model named {name!r} "
                f"in the registry at {redact(tracking_uri)}"
            ) from exc
        raise


def _model_version(client: Any, uri: str, kind: str, name: str, wanted: str, tracking_uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    registered = _registered_model(client, uri, name, tracking_uri)
    if kind == "alias":
        aliases = dict(getattr(registered, "aliases", None) or {})
        if wanted not in aliases:
            known = f"aliases: {', '.join(sorted(aliases))}" if aliases else "it has no aliases"
            raise ModelError(f"model.uri: {uri}: registered model {name!r} has no alias {wanted!r} ({known})")
        return client.get_model_version_by_alias(name, wanted)
    if wanted != "latest":
        try:
            return client.get_model_version(name, wanted)
        except MlflowException as exc:
            if not _is_missing(exc):
                raise
    versions = _versions(client, name)
    if not versions:
        raise ModelError(f"model.uri: {uri}: registered model {name!r} has no versions")
    if wanted == "latest":
        return versions[-1]
    known = ", ".join(str(v.version) for v in versions[-10:])
    raise ModelError(
        f"model.uri: {uri}: registered model {name!r} has no version {wanted} (versions: {known})"
    )


def _model_id_of(version: Any) -> str | None:
    model_id = getattr(version, "model_id", None)
    if model_id:
        return str(model_id)
    source = str(version.source or "").removeprefix("models:/")
    return source if _LOGGED_MODEL_ID.fullmatch(source) else None


def _from_run(client: Any, uri: str, run_id: str, path: str, tracking_uri: str) -> RegistryModel:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if _is_missing(exc):
            raise ModelError(
                f"model.uri: {uri}: no run {run_id} in the tracking store at {redact(tracking_uri)}"
            ) from exc
        raise
    # MLflow 3 keeps a model logged in a run as a LoggedModel named after its path; MLflow 2 kept it in
    # the run's own artifacts.
    name, _, inner = path.partition("/")
    logged = [
        model
        for model in client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"name = '{name}' AND source_run_id = '{run_id}'",
        )
        if model.source_run_id == run_id
    ]
    if logged:
        model_id = logged[0].model_id
        location = logged[0].artifact_location.rstrip("/") + (f"/{inner}" if inner else "")
    else:
        model_id = None
        location = f"{run.info.artifact_uri.rstrip('/')}/{path}"
    registered = [
        v
        for v in client.search_model_versions(f"run_id = '{run_id}'")
        if v.source in {uri, location, f"models:/{model_id}"}
    ]
    name_version = (registered[0].name, str(registered[0].version)) if len(registered) == 1 else (None, None)
    return RegistryModel(
        uri=uri,
        location=location,
        tracking_uri=tracking_uri,
        run_id=run_id,
        name=name_version[0],
        version=name_version[1],
        model_id=model_id,
    )


def resolve_registry_model(config: MlflowModel) -> RegistryModel:
    """The concrete model model.uri names now: registered name and version, source run, files."""
    from mlflow.exceptions import MlflowException

    kind, first, second = parse_model_uri(config.uri)
    client, tracking_uri = _client(config)
    try:
        if kind == "run":
            return _from_run(client, config.uri, first, second, tracking_uri)
        if kind == "logged":
            try:
                logged = client.get_logged_model(first)
            except MlflowException as exc:
                if _is_missing(exc):
                    raise ModelError(
                        f"model.uri: {config.uri}: no logged model {first} in the tracking store at "
                        f"{redact(tracking_uri)}"
                    ) from exc
                raise
            return RegistryModel(
                uri=config.uri,
                location=logged.artifact_location,
                tracking_uri=tracking_uri,
                run_id=logged.source_run_id,
                model_id=logged.model_id,
            )
        version = _model_version(client, config.uri, kind, first, second, tracking_uri)
        return RegistryModel(
            uri=config.uri,
            location=client.get_model_version_download_uri(version.name, str(version.version)),
            tracking_uri=tracking_uri,
            run_id=version.run_id or None,
            name=version.name,
            version=str(version.version),
            model_id=_model_id_of(version),
        )
    except MlflowException as exc:
        message = one_line(exc.message, 300)
        raise ModelError(
            f"model.uri: {config.uri}: cannot read the registry at {redact(tracking_uri)}: {message}"
        ) from exc


def _download(model: RegistryModel) -> Path:
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    try:
        local = Path(download_artifacts(artifact_uri=model.location, tracking_uri=model.tracking_uri))
    except (MlflowException, OSError) as exc:
        message = one_line(exc, 300)
        raise ModelError(f"model.uri: {model.uri}: cannot download the model's files: {message}") from exc
    if not (local / "MLmodel").is_file():
        raise ModelError(
            f"model.uri: {model.uri}: no MLflow model there (no MLmodel file in {model.location})"
        )
    return local


def _load_flavor(flavor: str, local: Path, uri: str) -> Any:
    """The model object through mlflow.<flavor>.load_model, with one-line errors."""
    try:
        return importlib.import_module(f"mlflow.{flavor}").load_model(str(local))
    except ModuleNotFoundError as exc:
        raise ModelError(
            f"model.uri: {uri}: the {flavor} model needs module {exc.name!r}, which is not installed"
        ) from exc
    except ModelError:
        raise
    except Exception as exc:
        message = one_line(exc, 300)
        raise ModelError(f"model.uri: {uri}: cannot load the {flavor} model: {message}") from exc


def _native_predictor(config: MlflowModel, flavor: str, model: Any) -> Predictor | None:
    module = type(model).__module__
    if module.startswith("xgboost") and type(model).__name__ == "Booster":
        return BoosterPredictor(config.name, model, config.effective_output)
    if flavor == "lightgbm" and not hasattr(model, "fit"):
        # A raw lightgbm.Booster has no scikit-learn predict_proba; its pyfunc serves instead.
        return None
    return LocalPredictor(config.name, model, config.effective_output)


def load_registry_predictor(config: MlflowModel) -> Predictor:
    """The model at model.uri as a Predictor: native for sklearn/xgboost/lightgbm, else its pyfunc."""
    from mlflow.models import Model

    model = resolve_registry_model(config)
    local = _download(model)
    flavors = Model.load(str(local / "MLmodel")).flavors
    for flavor in NATIVE_FLAVORS:
        if flavor in flavors:
            predictor = _native_predictor(config, flavor, _load_flavor(flavor, local, config.uri))
            if predictor is not None:
                return predictor
    if "python_function" not in flavors:
        raise ModelError(
            f"model.uri: {config.uri}: flavors {', '.join(sorted(flavors))} have no python_function to call"
        )
    if config.output not in (None, "predict"):
        raise ModelError(
            f"model.output: {config.output} is not available for {config.uri} "
            f"(flavors: {', '.join(sorted(flavors))}); its pyfunc predict() is explained, so set predict"
        )
    return PyfuncPredictor(config.name, _load_flavor("pyfunc", local, config.uri))
