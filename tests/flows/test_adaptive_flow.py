"""explainer.estimator adaptive end to end: standard errors beside the values, what it spent, in MLflow."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import artifact, exact_shapley, run_cli

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_an_adaptive_run_logs_standard_errors_and_what_it_spent(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    frame = pd.read_csv(cancer_data)
    frame.insert(0, "tumour", [f"T{i:03d}" for i in range(len(frame))])
    data = tmp_path / "cancer-ids.csv"
    frame.to_csv(data, index=False)
    config = write_config(
        model={"name": "cancer-adaptive", "kind": "sklearn", "path": str(mlp_model)},
        data={"source": str(data), "target": "malignant", "id_column": "tumour", "explain_rows": 12},
        background={"method": "random", "size": 10, "seed": 0},
        # 8 features and 100 coalitions: the hybrid (2^8 - 2 = 254 would not fit), so values are sampled.
        explainer={
            "algorithm": "kernel",
            "estimator": "adaptive",
            "tolerance": 0.001,
            "nsamples": 100,
            "link": "identity",
        },
        shards={"size": 6, "workers": 2},
        output={"plots": ["bar", "waterfall"], "top_k": 1},
    )
    code, summary, err = run_cli(["run", str(config), "--json"], capsys)
    assert code == 0, err
    run = MlflowClient(mlflow_store).get_run(summary["mlflow_run_id"])
    params, metrics = run.data.params, run.data.metrics
    assert params["explainer.estimator"] == "adaptive" and params["explainer.tolerance"] == "0.001"
    assert "explainer.l1_reg" not in params  # shap's estimator's setting
    assert metrics["coalitions_per_row"] <= 100 and metrics["model_rows"] <= 12 * 100 * 10
    assert metrics["rows_unconverged"] == summary["rows_unconverged"] and metrics["max_standard_error"] > 0

    values = pd.read_parquet(artifact(mlflow_store, run.info.run_id, "shap_values.parquet", tmp_path))
    errors = pd.read_parquet(
        artifact(mlflow_store, run.info.run_id, "shap_standard_errors.parquet", tmp_path)
    )
    features = list(frame.columns[1:9])
    assert list(errors.columns) == ["row_id", "tumour", *features, "coalitions", "converged"]
    assert errors["row_id"].tolist() == values["row_id"].tolist()
    assert errors["tumour"].tolist() == values["tumour"].tolist()
    assert (errors["coalitions"] <= 100).all() and errors[features].to_numpy().max() > 0
    assert (~errors["converged"]).sum() == metrics["rows_unconverged"]
    # The report's Accuracy section: the estimator, tolerance, what was spent, the unconverged by name.
    report = artifact(mlflow_store, run.info.run_id, "report.html", tmp_path).read_text()
    accuracy = report.split('<h2 id="accuracy">')[1].split("<h2")[0]
    assert "adaptive" in accuracy and "0.001" in accuracy
    assert f"{12 - metrics['rows_unconverged']:.0f} of 12" in accuracy
    assert (
        f"{metrics['model_rows']:,.0f} (" in accuracy and "estimator at nsamples 100: 12,000 if" in accuracy
    )
    for name in errors.loc[~errors["converged"], "tumour"]:
        assert name in accuracy
    files = {a.path for a in MlflowClient(mlflow_store).list_artifacts(run.info.run_id, "plots")}
    assert any(f.startswith("plots/waterfall_T") for f in files)
    importance = pd.read_csv(artifact(mlflow_store, run.info.run_id, "global_importance.csv", tmp_path))
    assert "mean_abs_se" in importance.columns and (importance["mean_abs_se"] > 0).any()

    # The values are Shapley's within their intervals (identity link on P(malignant): an exact reference).
    model = joblib.load(mlp_model)
    background = pd.read_parquet(artifact(mlflow_store, run.info.run_id, "background.parquet", tmp_path))
    for position in range(3):
        row = frame.loc[int(values["row_id"].iloc[position]), features].to_numpy(dtype=float)
        exact = exact_shapley(
            lambda a: model.predict_proba(pd.DataFrame(a, columns=features))[:, 1], row, background.to_numpy()
        )
        found = values[features].iloc[position].to_numpy()
        assert np.all(np.abs(found - exact) <= 4 * errors[features].iloc[position].to_numpy() + 1e-9)
