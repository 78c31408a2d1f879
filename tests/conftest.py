"""Shared fixtures: one Prefect test server per session, a fresh sqlite MLflow store per test, real models."""

from __future__ import annotations

import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import joblib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """A temporary local Prefect server for every test that runs the real flow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test logs to its own sqlite MLflow store (and keeps finished shards in its own folder)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SHAPLINE_CACHE_DIR", str(tmp_path / "shard-cache"))
    return uri


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def cancer_data(models_dir: Path) -> Path:
    """Real data shipped with scikit-learn: 569 tumours, the first 8 numeric features, binary target."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.frame.iloc[:, :8].copy()
    frame.columns = [c.replace(" ", "_") for c in frame.columns]
    frame["malignant"] = 1 - bunch.target
    path = models_dir / "cancer.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def xgb_model(models_dir: Path, cancer_data: Path) -> Path:
    """An XGBoost classifier (sklearn wrapper) saved with joblib."""
    import xgboost

    frame = pd.read_csv(cancer_data)
    model = xgboost.XGBClassifier(n_estimators=30, max_depth=3, n_jobs=1, random_state=0)
    model.fit(frame.drop(columns=["malignant"]), frame["malignant"])
    path = models_dir / "cancer-xgb.joblib"
    joblib.dump(model, path)
    model.get_booster().save_model(str(models_dir / "cancer-xgb.json"))
    return path


@pytest.fixture(scope="session")
def mlp_model(models_dir: Path, cancer_data: Path) -> Path:
    """A non-linear, non-tree model (kernel explainer territory) on the same 8 features."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    frame = pd.read_csv(cancer_data)
    model = make_pipeline(
        StandardScaler(), MLPClassifier(hidden_layer_sizes=(8,), max_iter=500, random_state=0)
    )
    model.fit(frame.drop(columns=["malignant"]), frame["malignant"])
    path = models_dir / "cancer-mlp.joblib"
    joblib.dump(model, path)
    return path


@pytest.fixture(scope="session")
def penguins(models_dir: Path) -> tuple[Path, Path]:
    """Real mixed-type data (text, numbers, missing values) and a Pipeline with encoders trained on it."""
    from palmerpenguins import load_penguins

    from flows.demo import train_penguin_model

    data = load_penguins()
    data_path, model_path = models_dir / "penguins.csv", models_dir / "penguins.joblib"
    data.to_csv(data_path, index=False)
    joblib.dump(train_penguin_model(data), model_path)
    return data_path, model_path


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a YAML config from sections into tmp_path and return its path."""

    written = iter(range(1_000_000))

    def write(name: str | None = None, **sections: Any) -> Path:
        path = tmp_path / (name or f"config-{next(written)}.yaml")
        path.write_text(yaml.safe_dump(sections, sort_keys=False))
        return path

    return write


def exact_shapley(
    function: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    background: np.ndarray,
    link: Callable[[np.ndarray], np.ndarray] = lambda v: v,
) -> np.ndarray:
    """Shapley values by enumerating every coalition: v(S) = link(mean over background of f(x_S, b_rest))."""
    from itertools import combinations
    from math import factorial

    m = len(x)

    def value(subset: tuple[int, ...]) -> float:
        rows = background.copy()
        rows[:, list(subset)] = x[list(subset)]
        return float(link(np.mean(function(rows))))

    cache = {s: value(s) for k in range(m + 1) for s in combinations(range(m), k)}
    phi = np.zeros(m)
    for i in range(m):
        others = [j for j in range(m) if j != i]
        for k in range(m):
            weight = factorial(k) * factorial(m - k - 1) / factorial(m)
            for subset in combinations(others, k):
                with_i = tuple(sorted((*subset, i)))
                phi[i] += weight * (cache[with_i] - cache[subset])
    return phi
