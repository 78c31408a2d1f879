"""The data, models, configs and flow runs the comparisons share."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from benchmarks.harness import Tolerance

TARGET = "target"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "shapline-benchmarks-cache"
# Overrides every flow run of this benchmark gets (one per line); children inherit them with the environment.
EXTRA_OVERRIDES_ENV = "SHAPLINE_BENCH_SET"

# XGBoost returns float32 probabilities: plain shap keeps f(x) in float32 where shapline's predictor casts to
# float64 first, so the two agree to float32 rounding. Another seed would differ by ~1e-2.
KERNEL_TOLERANCE = Tolerance(
    rtol=1e-5, atol=1e-6, why="same per-row seeds and model calls; float32 model output"
)
# Every tree side ends in xgboost's own TreeSHAP (shap's TreeExplainer hands XGBoost models to pred_contribs).
TREE_TOLERANCE = Tolerance(rtol=1e-5, atol=1e-6, why="xgboost's TreeSHAP in float32 on every side")


def prepare_environment() -> None:
    """Quiet telemetry, headless plots, and dummy AWS credentials so boto3 never looks for real ones."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MPLBACKEND", "Agg")
    # Prefect's per-shard INFO lines stay off the terminal (they still reach the Prefect API, as in production).
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The benchmark's Prefect server records task runs as the one `shapline run` starts does.
    from shapline.flows.cli import PREFECT_SERVER_DEFAULTS

    for name, value in PREFECT_SERVER_DEFAULTS.items():
        os.environ.setdefault(name, value)
    # Only the local endpoint is ever called; these values are placeholders, not secrets (and no word that
    # paths hold: shapline redacts a secret-looking variable's value wherever it appears).
    os.environ.update(
        AWS_ACCESS_KEY_ID="placeholder-key-id",
        AWS_SECRET_ACCESS_KEY="placeholder-secret",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME",
    ):
        os.environ.pop(name, None)


@contextlib.contextmanager
def prefect_server() -> Iterator[float]:
    """One Prefect server for every flow run of the benchmark; yields its start-up seconds (0 if given one)."""
    if os.environ.get("PREFECT_API_URL"):
        yield 0.0
        return
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    started = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=180):
        # Child processes (RSS-measured sides, cold CLI runs) reach the same server through the environment.
        os.environ["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
        try:
            yield time.perf_counter() - started
        finally:
            os.environ.pop("PREFECT_API_URL", None)


@dataclass(frozen=True)
class Dataset:
    """A data file with a target column and a model trained on it."""

    data_path: Path
    model_path: Path
    features: list[str]

    def frame(self) -> pd.DataFrame:
        """The data as the flow reads it: row_id = position in the file."""
        return pd.read_parquet(self.data_path).reset_index(drop=True)


def _xgb_classifier(**params: Any) -> Any:
    import xgboost

    return xgboost.XGBClassifier(random_state=0, **params)


def breast_cancer(cache: Path, n_estimators: int = 100) -> Dataset:
    """sklearn's breast-cancer data (569 rows, 30 numeric features, no download) and an XGBoost classifier."""
    import joblib

    folder = cache / f"breast-cancer-{n_estimators}"
    data_path, model_path = folder / "data.parquet", folder / "model.joblib"
    if not model_path.is_file():
        from sklearn.datasets import load_breast_cancer

        folder.mkdir(parents=True, exist_ok=True)
        bunch = load_breast_cancer(as_frame=True)
        frame = bunch.data.copy()
        frame.columns = [c.replace(" ", "_") for c in frame.columns]
        # Default n_jobs, as a notebook leaves it: XGBoost then predicts with every core.
        model = _xgb_classifier(n_estimators=n_estimators, max_depth=4).fit(frame, bunch.target)
        frame[TARGET] = bunch.target.to_numpy()
        frame.to_parquet(data_path)
        joblib.dump(model, model_path)
    features = [c for c in pd.read_parquet(data_path).columns if c != TARGET]
    return Dataset(data_path, model_path, features)


def wine(cache: Path) -> Dataset:
    """sklearn's wine data (178 rows, 13 numeric features, no download), class 0 against the rest, and an
    XGBoost classifier: the accuracy benchmark's 10-15 feature workload."""
    import joblib

    folder = cache / "wine"
    data_path, model_path = folder / "data.parquet", folder / "model.joblib"
    if not model_path.is_file():
        from sklearn.datasets import load_wine

        folder.mkdir(parents=True, exist_ok=True)
        bunch = load_wine(as_frame=True)
        frame = bunch.data.copy()
        frame.columns = [c.replace(" ", "_").replace("/", "_") for c in frame.columns]
        target = (bunch.target == 0).astype(int)
        model = _xgb_classifier(n_estimators=100, max_depth=4).fit(frame, target)
        frame[TARGET] = target.to_numpy()
        frame.to_parquet(data_path)
        joblib.dump(model, model_path)
    features = [c for c in pd.read_parquet(data_path).columns if c != TARGET]
    return Dataset(data_path, model_path, features)


def penguins(cache: Path) -> Dataset:
    """The demo's data (palmerpenguins, 344 birds: text, numbers, missing values) and its Pipeline."""
    import joblib

    folder = cache / "penguins"
    data_path, model_path = folder / "data.parquet", folder / "model.joblib"
    if not model_path.is_file():
        from palmerpenguins import load_penguins

        from shapline.flows.demo import train_penguin_model

        folder.mkdir(parents=True, exist_ok=True)
        frame = load_penguins()
        joblib.dump(train_penguin_model(frame), model_path)
        frame.rename(columns={"species": TARGET}).to_parquet(data_path)
    features = [c for c in pd.read_parquet(data_path).columns if c != TARGET]
    return Dataset(data_path, model_path, features)


def synthetic(cache: Path, rows: int, n_features: int = 30, train_rows: int = 100_000) -> Dataset:
    """make_classification data of `rows` rows and an XGBoost classifier (50 trees, depth 4) trained on the first `train_rows`."""
    import joblib

    folder = cache / f"synthetic-{rows}x{n_features}-50x4"
    data_path, model_path = folder / "data.parquet", folder / "model.joblib"
    if not model_path.is_file():
        from sklearn.datasets import make_classification

        folder.mkdir(parents=True, exist_ok=True)
        x, y = make_classification(
            n_samples=rows,
            n_features=n_features,
            n_informative=min(12, n_features),
            n_redundant=min(6, n_features // 4),
            random_state=0,
        )
        frame = pd.DataFrame(x, columns=[f"f{j:02d}" for j in range(n_features)])
        # TreeSHAP costs trees x leaves x depth^2 per row: a modest model keeps 1M rows to ~20 s on 2 cores.
        model = _xgb_classifier(n_estimators=50, max_depth=4, tree_method="hist").fit(
            frame.iloc[:train_rows], y[:train_rows]
        )
        frame[TARGET] = y
        frame.to_parquet(data_path)
        joblib.dump(model, model_path)
    features = [f"f{j:02d}" for j in range(n_features)]
    return Dataset(data_path, model_path, features)


def xgboost_file(dataset: Dataset, suffix: str) -> Path:
    """The dataset's XGBoost model saved the way XGBoost recommends (`save_model`), as .json or .ubj."""
    path = dataset.model_path.with_suffix(suffix)
    if not path.is_file():
        import joblib

        joblib.load(dataset.model_path).save_model(path)
    return path


def registry_model(dataset: Dataset, flavour: str, tracking_uri: str, folder: Path, name: str) -> str:
    """The dataset's model logged with mlflow.<flavour>.log_model and registered as `name` in the store at
    `tracking_uri` (its artifacts in `folder`); the models:/ URI of that version."""
    import importlib

    import joblib
    import mlflow
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("bench-models")
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment("bench-models", artifact_location=folder.as_uri())
    )
    options: dict[str, Any] = {"pip_requirements": ["scikit-learn", "xgboost"]}  # declared: not inferred
    if flavour == "sklearn":
        options["serialization_format"] = "cloudpickle"
    with _use_tracking_uri(tracking_uri), mlflow.start_run(experiment_id=experiment_id):
        logged = importlib.import_module(f"mlflow.{flavour}").log_model(
            joblib.load(dataset.model_path), name="model", registered_model_name=name, **options
        )
    return f"models:/{name}/{logged.registered_model_version}"


def sliced(dataset: Dataset, rows: int) -> Dataset:
    """The first `rows` rows of a dataset in their own file, explained by the same model."""
    path = dataset.data_path.with_name(f"data-first-{rows}.parquet")
    if not path.is_file():
        pd.read_parquet(dataset.data_path).iloc[:rows].to_parquet(path)
    return Dataset(path, dataset.model_path, dataset.features)


def write_config(folder: Path, name: str, **sections: dict[str, Any]) -> Path:
    """A shapline YAML config in `folder`; every comparison of a run logs to one sqlite MLflow store beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    sections.setdefault("output", {})
    # One store per benchmark run: creating a fresh MLflow schema costs seconds, a fixed cost counted once.
    sections["output"] = {"tracking_uri": f"sqlite:///{folder.parent / 'mlflow.db'}", **sections["output"]}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


@dataclass
class FlowRun:
    """One `shapline run`: its wall time, the JSON summary, the MLflow metrics and (optionally) the values."""

    seconds: float
    summary: dict[str, Any]
    metrics: dict[str, float]
    values: pd.DataFrame | None


def fresh_cache_overrides(folder: Path) -> list[str]:
    """A new shard store per run: finished shards of an earlier side must never be reused as a result."""
    return [f"shards.cache_dir={folder / 'shard-cache' / uuid.uuid4().hex}"]


def run_flow(config: Path, overrides: list[str] | None = None, fetch_values: bool = True) -> FlowRun:
    """Run `shapline run CONFIG --json` in this process (the Prefect server is already up) and collect its output."""
    from mlflow.tracking import MlflowClient

    from shapline.flows.cli import main

    extra = [line for line in os.environ.get(EXTRA_OVERRIDES_ENV, "").splitlines() if line]
    overrides = [*extra, *(overrides or []), *fresh_cache_overrides(config.parent)]
    argv = ["run", str(config), "--json", "--debug"]
    for item in overrides:
        argv += ["--set", item]
    captured = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(captured):
        code = main(argv)
    seconds = time.perf_counter() - started
    lines = captured.getvalue().strip().splitlines()
    if code != 0 or not lines:
        raise RuntimeError(f"shapline run {config.name} exited {code}: {captured.getvalue()[-2000:]}")
    summary = json.loads(lines[-1])
    if summary.get("shards_reused"):
        raise RuntimeError(f"shapline run {config.name} reused {summary['shards_reused']} cached shards")
    client = MlflowClient(summary["tracking_uri"])
    metrics = dict(client.get_run(summary["mlflow_run_id"]).data.metrics)
    values = read_values(summary) if fetch_values else None
    return FlowRun(seconds, summary, metrics, values)


def values_artifact(summary: dict[str, Any], folder: Path) -> Path:
    """Download a run's shap_values.parquet into `folder`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    return Path(client.download_artifacts(summary["mlflow_run_id"], "shap_values.parquet", str(folder)))


def read_values(summary: dict[str, Any]) -> pd.DataFrame:
    """A run's shap_values.parquet as a frame indexed by row_id."""
    with tempfile.TemporaryDirectory(prefix="shapline-bench-values-") as folder:
        frame = pd.read_parquet(values_artifact(summary, Path(folder)))
    return frame.set_index("row_id")


def values_matrix(frame: pd.DataFrame, features: list[str], row_ids: np.ndarray) -> np.ndarray:
    """The SHAP values of `row_ids` (in that order) as a (rows, features) matrix; NaN rows if any id is missing."""
    return frame.reindex(row_ids)[features].to_numpy(dtype=float)


def explain_sample(frame: pd.DataFrame, rows: int | str, seed: int) -> pd.DataFrame:
    """The rows the flow explains for data.explain_rows/data.seed (the same pandas call as tasks.data)."""
    if rows == "all" or int(rows) >= len(frame):
        return frame
    return frame.sample(n=int(rows), random_state=seed).sort_index()


def random_background(frame: pd.DataFrame, size: int, seed: int) -> pd.DataFrame:
    """The background the flow draws for background.method random (shap.sample, then row order)."""
    import shap

    if size >= len(frame):
        return frame
    return shap.sample(frame, size, random_state=seed).sort_index()


def per_row_kernel_values(
    function: Any,
    background: np.ndarray,
    rows: pd.DataFrame,
    nsamples: int | str,
    l1_reg: str | bool,
    seed: int,
    link: str = "logit",
) -> np.ndarray:
    """Plain shap.KernelExplainer, one row at a time, numpy's global RNG seeded per row as shapline seeds it."""
    import shap

    from shapline.tasks.explainers.explain import row_seed

    explainer = shap.KernelExplainer(function, background, link=link)
    values = np.empty(rows.shape)
    for position, (row_id, row) in enumerate(zip(rows.index, rows.to_numpy(), strict=True)):
        np.random.seed(row_seed(seed, int(row_id)))
        shap_values = explainer.shap_values(row.reshape(1, -1), nsamples=nsamples, l1_reg=l1_reg, silent=True)
        values[position] = np.asarray(shap_values, dtype=float).reshape(-1)
    return values


def warm_up(context: Any) -> float:
    """Import everything a flow run imports and run one tiny flow, so no side pays first-run costs; returns seconds."""
    from benchmarks.child import preload

    started = time.perf_counter()
    preload()
    import boto3  # noqa: F401  (the endpoint sides' client)

    dataset = breast_cancer(context.cache)
    config = write_config(
        context.folder("warm-up"),
        "warm-up",
        model={"name": "bench-warm-up", "kind": "xgboost", "path": str(dataset.model_path)},
        data={"source": str(dataset.data_path), "target": "target", "explain_rows": 5},
        explainer={"algorithm": "tree"},
    )
    run_flow(config, fetch_values=False)
    return time.perf_counter() - started
