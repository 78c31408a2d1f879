"""End-to-end runs of the real flow (Prefect test server, sqlite MLflow store), against independent references."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
import shap
from mlflow.tracking import MlflowClient

from shapline.tasks.explainers.explain import ModelFunction
from shapline.tasks.models.predictors import LocalPredictor
from tests.helpers import (
    FreezeWitness,
    TaskRunWitness,
    all_runs,
    artifact,
    assert_same_values,
    days_since_epoch,
    exact_shapley,
    run_cli,
)

pytestmark = pytest.mark.usefixtures("prefect_server")


def cancer_config(
    write_config: Callable[..., Path], data_path: Path, model_path: Path, **overrides: Any
) -> Path:
    sections: dict[str, Any] = {
        "model": {"name": "cancer", "kind": "sklearn", "path": str(model_path), "task": "classification"},
        "data": {"source": str(data_path), "target": "malignant"},
        "background": {"method": "random", "size": 20, "seed": 0},
        "shards": {"size": 200, "runner": "thread", "workers": 2},
        "output": {"top_k": 2},
    }
    for section, values in overrides.items():
        sections[section] = {**sections.get(section, {}), **values}
    return write_config(**sections)


def test_tree_model_run_logs_everything_and_matches_tree_explainer(
    write_config: Callable[..., Path],
    cancer_data: Path,
    xgb_model: Path,
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = cancer_config(write_config, cancer_data, xgb_model, model={"kind": "xgboost"})
    code, summary, _ = run_cli(["run", str(config), "--json"], capsys)
    assert code == 0 and summary["status"] == "FINISHED"
    assert summary["rows_explained"] == 569 and summary["shards"] == 3
    assert summary["tracking_uri"] == mlflow_store
    for key in ("mlflow_run_id", "experiment_id", "additivity_max_error", "duration_s"):
        assert key in summary
    assert 0 < summary["explain_s"] <= summary["duration_s"]

    client = MlflowClient(mlflow_store)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "shapline/cancer"
    assert run.data.tags["shapline.model"] == "cancer"
    assert (
        len(run.data.tags["shapline.config_sha256"]) == 64
        and len(run.data.tags["shapline.data_sha256"]) == 64
    )
    assert run.data.tags["prefect.flow_run_id"]
    assert (
        run.data.params["explainer.algorithm"] == "auto"
        and run.data.params["explainer.algorithm_effective"] == "tree"
    )
    assert run.data.params["background.size"] == "20"
    metrics = run.data.metrics
    assert metrics["rows_explained"] == 569 and metrics["shards"] == 3 and metrics["validation_success"] == 1
    assert metrics["additivity_max_error"] < 1e-4 and metrics["duration_s"] > 0 and metrics["rows_per_s"] > 0
    assert summary["model_s"] is None and "model_s" not in metrics  # timed by the kernel engine only
    assert summary["model_cpu_s"] is None and "model_cpu_s" not in metrics

    names = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {
        "config.yaml",
        "validation.json",
        "background.parquet",
        "shap_values.parquet",
        "global_importance.csv",
        "plots",
    } <= names
    plots = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "plots")}
    assert {"bar.png", "beeswarm.png", "force.html"} <= plots
    # top_k 2: the 2 highest outputs, the 2 lowest and the 2 nearest the decision threshold.
    assert len([p for p in plots if p.startswith("waterfall_")]) == 6

    values = pd.read_parquet(artifact(mlflow_store, run.info.run_id, "shap_values.parquet", tmp_path))
    data = pd.read_csv(cancer_data).drop(columns=["malignant"])
    model = joblib.load(xgb_model)
    features = list(data.columns)
    assert list(values.columns) == ["row_id", *features, "base_value", "model_output"]
    assert values["row_id"].tolist() == list(range(569))
    np.testing.assert_allclose(
        values[features].to_numpy(), shap.TreeExplainer(model).shap_values(data), atol=1e-6
    )
    importance = pd.read_csv(artifact(mlflow_store, run.info.run_id, "global_importance.csv", tmp_path))
    assert list(importance.columns) == ["feature", "mean_abs", "mean", "median", "mean_sq", "std", "rank"]
    assert importance.loc[importance["rank"] == 1, "feature"].item() == values[features].abs().mean().idxmax()

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        published = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["shapline-cancer"]))
        )
    assert published and published[0].type == "markdown" and published[0].task_run_id is None
    published = [artifact.model_dump() for artifact in published]
    assert summary["mlflow_run_id"] in published[0]["data"] and "| 1 | " in published[0]["data"]


def test_kernel_run_equals_exact_shapley_values(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = cancer_config(
        write_config,
        cancer_data,
        mlp_model,
        data={"explain_rows": 3, "seed": 1},
        background={"size": 6},
        explainer={"nsamples": 256, "l1_reg": False},
        output={"plots": ["bar"]},
    )
    code, summary, _ = run_cli(["run", str(config), "--json"], capsys)
    assert code == 0
    run_id = summary["mlflow_run_id"]
    values = pd.read_parquet(artifact(mlflow_store, run_id, "shap_values.parquet", tmp_path))
    background = pd.read_parquet(artifact(mlflow_store, run_id, "background.parquet", tmp_path))
    data = pd.read_csv(cancer_data).drop(columns=["malignant"])
    predictor = LocalPredictor("mlp", joblib.load(mlp_model), "predict_proba")
    function = ModelFunction(predictor, data, [1], "logit")
    features = list(data.columns)
    assert len(values) == 3 and len(background) == 6
    for _, row in values.iterrows():
        x = data.loc[int(row["row_id"])].to_numpy()
        expected = exact_shapley(
            lambda rows: function(rows)[:, 0],
            x,
            background[features].to_numpy(),
            lambda p: np.log(p / (1 - p)),
        )
        np.testing.assert_allclose(row[features].to_numpy(dtype=float), expected, atol=1e-6)
    assert summary["additivity_max_error"] < 1e-9
    # Continuous data: synthetic rows hardly repeat, so a local model's calls are not deduplicated.
    assert "inference_rows_saved" not in MlflowClient(mlflow_store).get_run(run_id).data.metrics


@pytest.mark.slow
def test_many_shards_on_two_processes_equal_one_shard(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Sampled coalitions (nsamples << 2^M): values must not depend on shard size, runner or workers."""
    common = {
        "data": {"explain_rows": 12, "seed": 2},
        "explainer": {"nsamples": 40, "seed": 7},
        "output": {"plots": []},
    }
    one = cancer_config(write_config, cancer_data, mlp_model, shards={"size": 12, "workers": 1}, **common)
    many = cancer_config(
        write_config, cancer_data, mlp_model, shards={"size": 3, "runner": "process", "workers": 2}, **common
    )
    code_one, first, _ = run_cli(["run", str(one), "--json"], capsys)
    code_many, second, _ = run_cli(["run", str(many), "--json"], capsys)
    assert code_one == 0 and code_many == 0 and first["shards"] == 1 and second["shards"] == 4
    assert_same_values(mlflow_store, first, second, tmp_path)
    # The model's own seconds, summed over the workers (processes too): inside each worker's explain phase.
    for summary, workers in ((first, 1), (second, 2)):
        assert 0 < summary["model_s"] <= summary["explain_s"] * workers
        assert 0 < summary["model_cpu_s"] <= summary["model_s"] * 1.01 + 0.01  # one thread: CPU <= wall
    logged = MlflowClient(mlflow_store).get_run(second["mlflow_run_id"]).data.metrics
    assert logged["model_s"] == round(second["model_s"], 1)


def test_mixed_type_pipeline_explains_every_class(
    write_config: Callable[..., Path],
    penguins: tuple[Path, Path],
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data_path, model_path = penguins
    config = write_config(
        model={"name": "penguins", "kind": "sklearn", "path": str(model_path), "class_index": None},
        data={"source": str(data_path), "target": "species", "explain_rows": 16},
        validation={
            "expectations": [
                {
                    "expect_column_values_to_be_in_set": {
                        "column": "island",
                        "value_set": ["Biscoe", "Dream", "Torgersen"],
                    }
                }
            ]
        },
        background={"method": "stratified", "size": 12},
        shards={"size": 6},
        output={"top_k": 1, "plots": ["bar", "beeswarm", "waterfall"]},
    )
    code, summary, _ = run_cli(["run", str(config), "--json"], capsys)
    assert code == 0 and summary["algorithm"] == "kernel" and summary["shards"] == 3
    run_id = summary["mlflow_run_id"]
    values = pd.read_parquet(artifact(mlflow_store, run_id, "shap_values.parquet", tmp_path))
    assert values.columns[:2].tolist() == ["row_id", "class"] and len(values) == 16 * 3
    assert values["class"].unique().tolist() == ["Adelie", "Chinstrap", "Gentoo"]
    assert summary["additivity_max_error"] < 1e-9
    # Text columns repeat: each distinct synthetic row of a call went to the local model once.
    metrics = MlflowClient(mlflow_store).get_run(run_id).data.metrics
    assert metrics["inference_rows_saved"] > 0.2 * 16 * 12 * (2**7 - 2)
    importance = pd.read_csv(artifact(mlflow_store, run_id, "global_importance.csv", tmp_path))
    assert importance.columns[:2].tolist() == ["class", "feature"] and len(importance) == 3 * 7
    plots = {Path(f.path).name for f in MlflowClient(mlflow_store).list_artifacts(run_id, "plots")}
    assert {"bar.png", "beeswarm_Adelie.png", "beeswarm_Gentoo.png"} <= plots


def test_a_nullable_integer_column_with_missing_values_explains_as_its_float_copy(
    write_config: Callable[..., Path], mlflow_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Parquet file pandas wrote from a nullable Int64 column with missing values reads back with pandas'
    NA in it, whose == has no truth value: the kernel engine's test of which features vary stopped every
    shard on a TypeError, and the force plot's JSON on it. The run now ends as the same data with the
    column as floats (NaN) does, with the same values, for a model that reads NA as NaN."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    bunch = load_breast_cancer(as_frame=True)
    features = bunch.data.iloc[:, :4].copy()
    rng = np.random.default_rng(0)
    features["visits"] = pd.array(rng.integers(0, 5, len(features)), dtype="Int64")
    features.loc[rng.random(len(features)) < 0.25, "visits"] = pd.NA
    model = make_pipeline(SimpleImputer(), LogisticRegression(max_iter=1000)).fit(features, bunch.target)
    joblib.dump(model, tmp_path / "model.joblib")
    summaries = []
    for name, frame in (("nullable", features), ("floats", features.astype({"visits": "float64"}))):
        frame.assign(malignant=bunch.target).to_parquet(tmp_path / f"{name}.parquet")
        config = write_config(
            model={"name": name, "kind": "sklearn", "path": str(tmp_path / "model.joblib")},
            data={"source": str(tmp_path / f"{name}.parquet"), "target": "malignant", "explain_rows": 12},
            background={"method": "random", "size": 15, "seed": 0},
            explainer={"algorithm": "kernel", "nsamples": 60, "l1_reg": "aic"},
            shards={"size": 6},
            output={"plots": ["force", "waterfall"]},
        )
        code, summary, _ = run_cli(["run", str(config), "--json"], capsys)
        assert code == 0, summary
        summaries.append(summary)
    assert pd.read_parquet(tmp_path / "nullable.parquet")["visits"].isna().sum() > 0
    assert pd.read_parquet(tmp_path / "nullable.parquet")["visits"].dtype == "Int64"
    assert_same_values(mlflow_store, summaries[0], summaries[1], tmp_path, atol=1e-12)


def test_time_columns_explain_and_show_in_the_force_plot(
    write_config: Callable[..., Path], mlflow_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A time column (with a zone and missing times, and without) is a feature like another: the kernel engine
    builds its synthetic rows, and the force plot's page, which writes each feature's value as JSON, shows
    it as ISO text; its JSON stopped the run on a Timestamp."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    bunch = load_breast_cancer(as_frame=True)
    features = bunch.data.iloc[:, :3].copy()
    rng = np.random.default_rng(0)
    days = pd.to_timedelta(rng.integers(0, 300, len(features)), unit="D")
    features["seen"] = pd.Timestamp("2026-01-01", tz="UTC") + days
    features.loc[rng.random(len(features)) < 0.1, "seen"] = pd.NaT
    features["opened"] = pd.Timestamp("2025-01-01") + days[::-1]
    model = make_pipeline(
        FunctionTransformer(days_since_epoch),
        SimpleImputer(),
        StandardScaler(),
        LogisticRegression(max_iter=2000),
    ).fit(features, bunch.target)
    joblib.dump(model, tmp_path / "model.joblib")
    features.assign(malignant=bunch.target).to_parquet(tmp_path / "times.parquet")
    config = write_config(
        model={"name": "times", "kind": "sklearn", "path": str(tmp_path / "model.joblib")},
        data={"source": str(tmp_path / "times.parquet"), "target": "malignant", "explain_rows": 8},
        background={"method": "random", "size": 10, "seed": 0},
        explainer={"algorithm": "kernel", "nsamples": 40},
        shards={"size": 4},
        output={"plots": ["force"]},
    )
    code, summary, _ = run_cli(["run", str(config), "--json"], capsys)
    assert code == 0, summary
    assert summary["additivity_max_error"] < 1e-9
    page = artifact(mlflow_store, summary["mlflow_run_id"], "plots/force.html", tmp_path).read_text()
    values = pd.read_parquet(
        artifact(mlflow_store, summary["mlflow_run_id"], "shap_values.parquet", tmp_path)
    )
    first = features.loc[int(values["row_id"].iloc[0])]
    assert f'"{first["opened"].isoformat()}"' in page


def test_an_xgboost_file_with_category_columns_explains_with_the_tree_explainer(
    write_config: Callable[..., Path], mlflow_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """XGBoost trained with enable_categorical, saved as its .json (a raw Booster): shap's TreeExplainer built
    a DMatrix without categories and every shard stopped on XGBoost's refusal. Its values now equal those of
    the same model pickled as an XGBClassifier (which tells shap its own setting). With
    feature_perturbation interventional, which walks the trees with the background as numbers, the run is
    refused before any shard, in one line that names the column."""
    import xgboost
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    features = bunch.data.iloc[:, :4].copy()
    rng = np.random.default_rng(0)
    features["grade"] = pd.Categorical(rng.choice(["a", "b", "c"], len(features)))
    features.loc[rng.random(len(features)) < 0.1, "grade"] = np.nan
    model = xgboost.XGBClassifier(n_estimators=20, max_depth=3, enable_categorical=True, tree_method="hist")
    model.fit(features, bunch.target)
    model.save_model(tmp_path / "model.json")
    joblib.dump(model, tmp_path / "model.joblib")
    features.assign(malignant=bunch.target).to_parquet(tmp_path / "graded.parquet")

    def run(path: str, **explainer: str) -> tuple[int, dict[str, Any], str]:
        config = write_config(
            model={"name": Path(path).suffix[1:], "kind": "xgboost", "path": str(tmp_path / path)},
            data={"source": str(tmp_path / "graded.parquet"), "target": "malignant", "explain_rows": 8},
            background={"method": "random", "size": 10, "seed": 0},
            explainer=explainer,
            shards={"size": 4},
            output={"plots": ["bar"]},
        )
        return run_cli(["run", str(config), "--json"], capsys)

    summaries = []
    for path in ("model.json", "model.joblib"):
        code, summary, _ = run(path)
        assert code == 0 and summary["algorithm"] == "tree", summary
        summaries.append(summary)
    assert_same_values(mlflow_store, summaries[0], summaries[1], tmp_path, atol=1e-6)
    code, summary, err = run("model.json", feature_perturbation="interventional")
    assert code != 0 and summary["status"] == "FAILED"
    errors = [line for line in err.splitlines() if line.startswith("shapline: error:")]
    assert errors == [
        "shapline: error: explainer.feature_perturbation interventional: shap's tree algorithm reads numbers "
        "only; non-numeric: grade; use tree_path_dependent (the default) or explainer.algorithm kernel"
    ]
    assert "explain-shard" not in err


def test_the_runner_prepares_for_the_algorithm_the_plan_resolved(
    write_config: Callable[..., Path],
    penguins: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """explainer.algorithm auto is known to be Kernel SHAP only once the plan has seen the model: the flow
    tells the runner then, so its warm-up (the engine's compiled code) starts before the first shard."""
    from shapline.tasks.compute import runners

    events: list[str] = []
    prepare, explain = runners.ThreadRunner.prepare, runners.explain_shard

    def spied_prepare(self: runners.ThreadRunner, algorithm: str) -> None:
        events.append(f"prepare {algorithm}")
        prepare(self, algorithm)

    def spied_explain(job: Any, limit: Any = None) -> Any:
        events.append("shard")
        return explain(job, limit)

    monkeypatch.setattr(runners.ThreadRunner, "prepare", spied_prepare)
    monkeypatch.setattr(runners, "explain_shard", spied_explain)
    data_path, model_path = penguins
    config = write_config(
        model={"name": "penguins-auto", "kind": "sklearn", "path": str(model_path)},
        data={"source": str(data_path), "target": "species", "explain_rows": 4},
        background={"size": 8},
        explainer={"nsamples": 40},
        shards={"size": 2, "workers": 1},
        output={"plots": []},
    )
    code, summary, err = run_cli(["run", str(config), "--json"], capsys)
    assert code == 0 and summary["algorithm"] == "kernel", err
    assert events[:2] == ["prepare auto", "prepare kernel"] and events[2:] == ["shard", "shard"], events


def test_xgboost_booster_file(
    write_config: Callable[..., Path],
    cancer_data: Path,
    xgb_model: Path,
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    booster = xgb_model.with_suffix(".json")
    config = cancer_config(
        write_config,
        cancer_data,
        booster,
        model={"kind": "xgboost"},
        data={"explain_rows": 50},
        output={"plots": []},
    )
    code, summary, _ = run_cli(["run", str(config), "--json"], capsys)
    assert code == 0 and summary["algorithm"] == "tree"
    values = pd.read_parquet(
        artifact(mlflow_store, summary["mlflow_run_id"], "shap_values.parquet", tmp_path)
    )
    data = pd.read_csv(cancer_data).drop(columns=["malignant"]).loc[values["row_id"]]
    reference = shap.TreeExplainer(joblib.load(xgb_model)).shap_values(data)
    np.testing.assert_allclose(values[list(data.columns)].to_numpy(), reference, atol=1e-6)


def _bad_input(
    case: str, tmp_path: Path, cancer_data: Path, penguins: tuple[Path, Path]
) -> tuple[dict[str, Any], list[str]]:
    """A config section override (and any file it needs) for each bad input."""
    if case == "missing data file":
        return {"data": {"source": str(tmp_path / "missing.csv")}}, []
    if case == "missing feature column":
        return {"data": {"features": ["mean_radius", "Day Mins"]}}, []
    if case == "failing expectation":
        return {
            "validation": {
                "expectations": [
                    {
                        "expect_column_values_to_be_between": {
                            "column": "mean_radius",
                            "min_value": 0,
                            "max_value": 10,
                        }
                    }
                ]
            }
        }, []
    if case == "kmeans on a text column":
        data_path, model_path = penguins
        return {
            "model": {"path": str(model_path)},
            "data": {"source": str(data_path), "target": "species"},
            "background": {"method": "kmeans", "size": 5},
        }, []
    if case == "empty dataset":
        path = tmp_path / "empty.csv"
        pd.read_csv(cancer_data).head(0).to_csv(path, index=False)
        return {"data": {"source": str(path)}}, []
    frame = pd.read_csv(cancer_data)
    if case in ("repeated column in a CSV", "repeated column in a Parquet file"):
        # The second mean_radius is another measurement under the same name: pandas would call it
        # mean_radius.1 and the model would be explained on the wrong one.
        doubled = pd.concat(
            [frame, frame[["mean_texture"]].rename(columns={"mean_texture": "mean_radius"})], axis=1
        )
        if case.endswith("CSV"):
            path = tmp_path / "doubled.csv"
            doubled.to_csv(path, index=False)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            path = tmp_path / "doubled.parquet"
            pq.write_table(
                pa.Table.from_arrays(
                    [pa.array(doubled.iloc[:, i]) for i in range(doubled.shape[1])],
                    names=list(doubled.columns),
                ),
                path,
            )
        return {"data": {"source": str(path), "features": list(frame.columns[:8])}}, []
    if case == "dropped column that does not exist":
        return {"data": {"drop": ["Phone"]}}, []
    if case == "NaN in one row":
        path = tmp_path / "with-nan.csv"
        frame.loc[417, "mean_area"] = float("nan")
        frame.to_csv(path, index=False)
        return {"data": {"source": str(path)}}, []
    if case == "text in a numeric column":
        path = tmp_path / "with-text.csv"
        frame["mean_area"] = frame["mean_area"].astype(object)
        frame.loc[233, "mean_area"] = "abc"
        frame.to_csv(path, index=False)
        return {"data": {"source": str(path)}, "explainer": {"algorithm": "kernel"}}, []
    if case == "kmeans with an all-missing column":
        path = tmp_path / "empty-column.csv"
        frame["mean_area"] = float("nan")
        frame.to_csv(path, index=False)
        return {"data": {"source": str(path)}, "background": {"method": "kmeans", "size": 5}}, []
    if case == "class labels that do not match the outputs":
        return {"model": {"class_labels": ["benign", "malignant", "unsure"]}}, []
    if case == "nsamples 1 with aic":
        return {"explainer": {"algorithm": "kernel", "nsamples": 1, "l1_reg": "aic"}}, []
    if case == "expectation on a column the data lacks":
        return {
            "validation": {
                "expectations": [
                    {
                        "expect_column_values_to_be_between": {
                            "column": "Day Mins",
                            "min_value": 0,
                            "max_value": 400,
                        }
                    }
                ]
            }
        }, []
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing data file", r"data\.source: file not found: .*missing\.csv"),
        ("missing feature column", r"column 'Day Mins' is missing"),
        (
            "failing expectation",
            r"expect_column_values_to_be_between\(column='mean_radius'.*unexpected values",
        ),
        ("kmeans on a text column", r"kmeans needs numeric features; non-numeric columns: island, sex"),
        ("empty dataset", r"the data has 0 rows"),
        ("repeated column in a CSV", r"column 'mean_radius' appears more than once in the data"),
        ("repeated column in a Parquet file", r"column 'mean_radius' appears more than once in the data"),
        ("dropped column that does not exist", r"data\.drop: 'Phone' not in .*cancer\.csv"),
        (
            "NaN in one row",
            r"predict_proba\(\) failed on row_id 417 \(missing values in mean_area .*"
            r"expect_column_values_to_not_be_null.*\): Input X contains NaN",
        ),
        (
            "text in a numeric column",
            r"predict_proba\(\) failed on row_id 233 \(text in mean_area='abc'\): could not convert string",
        ),
        ("kmeans with an all-missing column", r"background\.method kmeans: column 'mean_area' has no values"),
        (
            "class labels that do not match the outputs",
            r"model\.class_labels: 3 labels for a model with 2 outputs; give one per output",
        ),
        (
            "nsamples 1 with aic",
            r"explainer\.nsamples 1 is too few for l1_reg aic with 8 features: it needs at least 5",
        ),
        (
            "expectation on a column the data lacks",
            r"validation\.expectations\[0\] expect_column_values_to_be_between: column 'Day Mins' is not in the data",
        ),
    ],
)
def test_bad_inputs_fail_with_one_clear_line_and_no_finished_run(
    case: str,
    message: str,
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    penguins: tuple[Path, Path],
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sections, _ = _bad_input(case, tmp_path, cancer_data, penguins)
    config = cancer_config(write_config, cancer_data, mlp_model, **sections)
    code, summary, err = run_cli(["run", str(config), "--json"], capsys)
    assert code != 0 and summary["status"] == "FAILED"
    errors = [line for line in err.splitlines() if line.startswith("shapline: error:")]
    assert len(errors) == 1, err
    assert re.search(message, errors[0]), errors[0]
    assert "Traceback" not in err
    runs = all_runs(mlflow_store)
    assert runs, "a run that got this far is in MLflow, FAILED"
    assert all(r.info.status == "FAILED" for r in runs)
    assert all("shapline.error" in r.data.tags for r in runs)


@pytest.mark.parametrize("name", ["invalid_yaml.yaml", "invalid_unknown_key.yaml", "invalid_wrong_type.yaml"])
def test_bad_configs_start_no_run(name: str, mlflow_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, summary, err = run_cli(["run", str(Path(__file__).parents[1] / "configs" / name), "--json"], capsys)
    assert code == 2 and summary["status"] == "FAILED" and name in err
    assert all_runs(mlflow_store) == []


def test_validate_command_checks_without_explaining(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    mlflow_store: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = cancer_config(write_config, cancer_data, mlp_model, shards={"size": 100})
    code, report, _ = run_cli(["validate", str(config), "--json"], capsys)
    assert code == 0 and report["ok"] and report["shards"] == 6 and report["algorithm"] == "kernel"
    failing = cancer_config(write_config, cancer_data, mlp_model, data={"features": ["nope"]})
    code, report, _ = run_cli(["validate", str(failing), "--json"], capsys)
    assert code == 1 and report["validation_failures"] == [
        "column 'nope' is missing (expect_column_to_exist)"
    ]
    assert all_runs(mlflow_store) == []


def test_a_read_only_tracking_store_is_one_line_and_no_library_traceback(
    write_config: Callable[..., Path],
    cancer_data: Path,
    xgb_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    database = tmp_path / "read-only.db"
    MlflowClient(f"sqlite:///{database}").search_experiments()
    # Root ignores file modes, so the store is opened read-only the way SQLite itself offers.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///file:{database}?mode=ro&uri=true")
    # MLflow makes the database's folder from that URI's path read literally: file:/tmp/... under the
    # working folder. Here, not in the checkout.
    monkeypatch.chdir(tmp_path)
    config = cancer_config(write_config, cancer_data, xgb_model, model={"kind": "xgboost"})
    code, summary, err = run_cli(["run", str(config), "--json"], capsys)
    assert code == 1 and summary["status"] == "FAILED"
    [line] = [line for line in err.splitlines() if line.startswith("shapline: error:")]
    assert re.search(
        r"output\.tracking_uri: cannot start a run .*: attempt to write a readonly database$", line
    )
    assert "Traceback" not in err and "[SQL:" not in line
    assert all_runs(f"sqlite:///{database}") == []


def test_a_runs_collections_skip_what_existed_before_it(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """While the flow runs, the heap that existed before it is frozen (a full collection walks only the
    run's objects); after it, nothing stays frozen. The model sees it from inside the run's shards."""
    import gc

    witness = tmp_path / "witness.joblib"
    joblib.dump(FreezeWitness(joblib.load(mlp_model)), witness)
    FreezeWitness.seen.clear()
    before = gc.get_freeze_count()
    config = cancer_config(
        write_config,
        cancer_data,
        witness,
        data={"explain_rows": 4},
        explainer={"algorithm": "kernel", "nsamples": 40},
        output={"plots": []},
    )
    code, summary, _ = run_cli(["run", str(config), "--json"], capsys)
    assert code == 0 and summary["status"] == "FINISHED"
    assert FreezeWitness.seen and min(FreezeWitness.seen) > before == 0
    assert gc.get_freeze_count() == 0


def test_a_workers_shards_are_started_ahead_of_their_tasks(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One thread worker, three shards: the first starts with the explain phase and each next one when the
    task before it has written its values, so no shard waits for Prefect to start its task; every model
    call of every shard runs in the flow's context, none in a task run's (where a shard its task started
    would run)."""
    witness = tmp_path / "witness.joblib"
    joblib.dump(TaskRunWitness(joblib.load(mlp_model)), witness)
    TaskRunWitness.seen.clear()
    config = cancer_config(
        write_config,
        cancer_data,
        witness,
        data={"explain_rows": 6},
        explainer={"algorithm": "kernel", "nsamples": 40},
        shards={"size": 2, "workers": 1},
        output={"plots": []},
    )
    code, summary, _ = run_cli(["run", str(config), "--json"], capsys)
    assert code == 0 and summary["status"] == "FINISHED"
    assert len(TaskRunWitness.seen) >= 3 and not any(TaskRunWitness.seen), TaskRunWitness.seen
