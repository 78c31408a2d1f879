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
import pandas as pd  # noqa: E402

# Prefect's console log handler keeps the sys.stderr of the moment Prefect is imported. Imported here,
# at collection, it keeps pytest's own capture rather than the stream of the first test's capsys,
# which is closed when that test ends.
import prefect.main  # noqa: E402, F401
import pytest  # noqa: E402
import yaml  # noqa: E402

# What tools keep in a checkout; anything else new there after the tests is a test writing outside its tmp_path.
_TOOL_FOLDERS = {".pytest_cache", ".mypy_cache", ".ruff_cache", "__pycache__", "build", "site"}


@pytest.fixture(scope="session", autouse=True)
def checkout_left_alone() -> Iterator[None]:
    """Tests write under their tmp_path, never into the working folder (the checkout, under CI): a run
    there with MLflow's defaults leaves ./mlruns or ./mlflow.db behind, as two tests did."""
    folder = Path.cwd().resolve()
    # Where the browser tests were asked to keep their screenshots (SHAPLINE_SCREENSHOTS=screenshots).
    screenshots = (folder / os.environ.get("SHAPLINE_SCREENSHOTS", "/")).resolve()
    asked = screenshots.relative_to(folder).parts[:1] if screenshots.is_relative_to(folder) else ()

    def entries() -> set[str]:
        return {
            p.name
            for p in folder.iterdir()
            if p.name not in _TOOL_FOLDERS and not p.name.endswith(".egg-info") and (p.name,) != asked
        }

    before = entries()
    yield
    left = sorted(entries() - before)
    assert not left, f"tests left {left} in {folder}: write under tmp_path (or chdir there)"


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


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy AWS credentials for the local endpoint (boto3's chain needs some); no real account is reached."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }.items():
        monkeypatch.setenv(key, value)


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

    from shapline.flows.demo import train_penguin_model

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


@pytest.fixture
def dmatrices(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows of every xgboost.DMatrix built from here on: a predict that builds one per call spends as
    much as a third of a kernel call on it."""
    import xgboost

    built: list[int] = []
    construct = xgboost.DMatrix.__init__

    def counted(self: xgboost.DMatrix, data: Any, *args: Any, **kwargs: Any) -> None:
        built.append(len(data))
        construct(self, data, *args, **kwargs)

    monkeypatch.setattr(xgboost.DMatrix, "__init__", counted)
    return built
