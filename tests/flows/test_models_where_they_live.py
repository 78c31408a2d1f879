"""The flow end to end with models behind an endpoint, in the MLflow registry, and shards on a Dask cluster."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
import shap
from mlflow.tracking import MlflowClient

from shapline.testing.endpoint import EndpointServer
from tests.helpers import assert_same_values, logged_values, run_cli

pytestmark = pytest.mark.usefixtures("prefect_server", "aws_env")


def kernel_sections(cancer_data: Path) -> dict[str, Any]:
    return {
        "data": {"source": str(cancer_data), "target": "malignant", "explain_rows": 6, "seed": 4},
        "background": {"size": 10},
        "explainer": {"algorithm": "kernel", "nsamples": 120, "seed": 3},
        "shards": {"size": 2, "workers": 2},
        "output": {"plots": []},
    }


def test_endpoint_run_equals_the_local_model_and_respects_the_payload_cap(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cap_mb = 0.05
    with EndpointServer(str(mlp_model), "cancer-endpoint", max_payload_bytes=int(cap_mb * 1e6)) as server:
        remote = write_config(
            model={
                "name": "cancer-remote",
                "kind": "sagemaker",
                "endpoint": {
                    "name": "cancer-endpoint",
                    "endpoint_url": server.url,
                    "region": "us-east-1",
                    "max_payload_mb": cap_mb,
                    "max_concurrency": 4,
                },
            },
            **kernel_sections(cancer_data),
        )
        code, summary, err = run_cli(["run", str(remote), "--json"], capsys)
        assert code == 0, err
        stats = dict(server.stats)
    local = write_config(
        model={"name": "cancer-local", "kind": "sklearn", "path": str(mlp_model)},
        **kernel_sections(cancer_data),
    )
    code, reference, err = run_cli(["run", str(local), "--json"], capsys)
    assert code == 0, err
    assert_same_values(mlflow_store, summary, reference, tmp_path, atol=1e-6)
    assert stats["too_large"] == 0 and stats["max_body_bytes"] <= cap_mb * 1e6
    metrics = MlflowClient(mlflow_store).get_run(summary["mlflow_run_id"]).data.metrics
    assert metrics["inference_rows"] > 6 * 10 * 120 and metrics["inference_requests"] >= 6
    assert metrics["inference_requests_sent"] == stats["requests"]


def test_budget_refuses_a_run_and_dry_run_prints_the_estimate(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    mlflow_store: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with EndpointServer(str(mlp_model), "cancer-endpoint") as server:
        config = write_config(
            model={
                "name": "cancer-budget",
                "kind": "sagemaker",
                "budget": {"max_inference_rows": 1000},
                "endpoint": {"name": "cancer-endpoint", "endpoint_url": server.url},
            },
            **kernel_sections(cancer_data),
        )
        code, plan, _ = run_cli(["run", str(config), "--dry-run", "--json"], capsys)
        assert code == 1 and plan["inference_rows"] > 1000 and plan["inference_requests"] >= 1
        code, summary, err = run_cli(["run", str(config), "--json"], capsys)
        assert code == 1 and "over model.budget.max_inference_rows 1,000" in summary["error"]
        served = server.stats["rows"]
    assert served < 100, "nothing but the probe reached the endpoint"
    runs = MlflowClient(mlflow_store).search_runs(
        [e.experiment_id for e in MlflowClient(mlflow_store).search_experiments()]
    )
    assert [r.info.status for r in runs] == ["FAILED"]


def test_registry_model_by_alias_is_explained_natively_and_tagged(
    write_config: Callable[..., Path],
    cancer_data: Path,
    xgb_model: Path,
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlflow

    model = joblib.load(xgb_model)
    mlflow.set_tracking_uri(mlflow_store)
    experiment = MlflowClient(mlflow_store).create_experiment(
        "models", artifact_location=(tmp_path / "models").as_uri()
    )
    with mlflow.start_run(experiment_id=experiment) as logged:
        mlflow.xgboost.log_model(model, name="model", registered_model_name="cancer-xgb")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    MlflowClient(mlflow_store).set_registered_model_alias("cancer-xgb", "champion", "1")
    config = write_config(
        model={"name": "cancer-registry", "kind": "mlflow", "uri": "models:/cancer-xgb@champion"},
        data={"source": str(cancer_data), "target": "malignant", "explain_rows": 30},
        output={"plots": []},
    )
    code, summary, err = run_cli(["run", str(config), "--json"], capsys)
    assert code == 0, err
    assert summary["algorithm"] == "tree"
    tags = MlflowClient(mlflow_store).get_run(summary["mlflow_run_id"]).data.tags
    assert tags["shapline.model_uri"] == "models:/cancer-xgb@champion"
    assert tags["shapline.model_version"] == "1" and tags["shapline.model_run_id"] == logged.info.run_id
    values = logged_values(mlflow_store, summary["mlflow_run_id"], tmp_path)
    data = pd.read_csv(cancer_data).drop(columns=["malignant"]).loc[values["row_id"]]
    np.testing.assert_allclose(
        values[list(data.columns)].to_numpy(), shap.TreeExplainer(model).shap_values(data), atol=1e-6
    )


@pytest.mark.slow
def test_dask_local_cluster_gives_the_thread_runner_values(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sections = kernel_sections(cancer_data)
    thread = write_config(
        model={"name": "cancer-thread", "kind": "sklearn", "path": str(mlp_model)}, **sections
    )
    dask = write_config(
        model={"name": "cancer-dask", "kind": "sklearn", "path": str(mlp_model)},
        **{**sections, "shards": {"size": 2, "runner": "dask", "workers": 2}},
    )
    code_thread, first, _ = run_cli(["run", str(thread), "--json"], capsys)
    code_dask, second, err = run_cli(["run", str(dask), "--json"], capsys)
    assert code_thread == 0 and code_dask == 0, err
    assert_same_values(mlflow_store, first, second, tmp_path)


def test_the_estimate_counts_every_row_the_run_sends_probe_included(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    mlflow_store: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Eight features and nsamples auto enumerate all 2**8 - 2 coalitions: the kernel estimate is exact.
    with EndpointServer(str(mlp_model), "counted") as server:
        config = write_config(
            model={
                "name": "cancer-counted",
                "kind": "sagemaker",
                "endpoint": {"name": "counted", "endpoint_url": server.url},
                # An endpoint answers numbers: the config names its classes.
                "class_labels": ["benign", "malignant"],
            },
            data={"source": str(cancer_data), "target": "malignant", "explain_rows": 3, "seed": 4},
            background={"size": 10},
            explainer={"algorithm": "kernel"},
            shards={"size": 3, "workers": 1},
            output={"plots": []},
        )
        code, summary, err = run_cli(["run", str(config), "--json"], capsys)
        served = server.stats
    assert code == 0, err
    run = MlflowClient(mlflow_store).get_run(summary["mlflow_run_id"])
    metrics = run.data.metrics
    assert run.data.params["model.class_label"] == "malignant"
    assert run.data.tags["shapline.endpoint"] == "counted"
    assert "probability of malignant" in run.data.tags["mlflow.note.content"]
    # Every row is counted: sent, or not sent because an identical row was in the same call.
    assert metrics["inference_rows_sent"] == served["rows"]
    assert metrics["inference_rows"] == metrics["inference_rows_sent"] + metrics["inference_rows_saved"]
    assert metrics["inference_requests"] == metrics["inference_requests_sent"] == served["requests"]
