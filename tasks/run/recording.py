"""What a run records in MLflow, step by step: tags, params, metrics, inputs, artifacts and the run's description.

Names are a contract (people script against them): new ones are added, none renamed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from shapline.tasks.common.config import (
    ExplainConfig,
    MlflowModel,
    SageMakerModel,
    SklearnModel,
    XGBoostModel,
)
from shapline.tasks.common.markup import markdown_code, markdown_text
from shapline.tasks.common.redact import redact
from shapline.tasks.common.schemas import (
    CLASS,
    DATA_SHA256_TAG,
    DATA_SOURCE_TAG,
    FEATURE,
    IDENTITY_TAG,
    MODEL_TAG,
    SELECTION_TAG,
    importance_metrics,
    monitor_param,
)
from shapline.tasks.compute.plan import DataCheck, RunPlan
from shapline.tasks.data.loading import LoadedData
from shapline.tasks.data.sources import file_sha256
from shapline.tasks.monitoring.drift import Baseline, ndcg_metrics
from shapline.tasks.results.aggregate import ERRORS_FILE, Aggregate
from shapline.tasks.results.summary import RunSummary
from shapline.tasks.run.monitor import Monitoring
from shapline.tasks.tracking.client import TrackedRun, log_artifact, log_artifacts, log_inputs, log_values
from shapline.tasks.tracking.uris import open_hint, run_page

# Logged before the plots, so the largest artifact uploads while they render.
VALUES_ARTIFACTS = ("shap_values.parquet", "global_importance.csv")
# MLflow keeps at most this many characters of a dataset digest: the start of the sha256 (the whole
# one is in the dataset's profile and the shapline.data_sha256 tag).
DATASET_DIGEST_CHARS = 36
# Explainer settings that mean something only for some explainers: others do not log them.
_ONLY_FOR = {
    "nsamples": {"kernel", "permutation"},
    "l1_reg": {"kernel"},
    "batch_rows": {"kernel"},
    "seed": {"kernel", "permutation"},
    "feature_perturbation": {"tree"},
    "estimator": {"kernel"},
    "tolerance": {"kernel"},
}
# And within the kernel explainer, settings one estimator uses and the other does not.
_ONLY_FOR_ESTIMATOR = {"l1_reg": "shap", "tolerance": "adaptive"}


@dataclass(frozen=True)
class PrefectContext:
    """Where the run came from in Prefect: its flow run, the UI page of it when known, its deployment."""

    flow_run_id: str
    flow_run_url: str | None = None
    deployment: str | None = None


def run_name(config: ExplainConfig, started: datetime) -> str:
    """The MLflow run's name: the model and when it ran (UTC)."""
    return f"{config.model.name} · {started:%Y-%m-%d %H:%M} UTC"


def run_tags(
    config: ExplainConfig, config_path: str, overrides: list[str], prefect: PrefectContext
) -> dict[str, str]:
    """The tags a run starts with: the model, the config (hash, path, overrides), what makes runs comparable (the
    settings, the rows), its source and Prefect run."""
    tags = {
        MODEL_TAG: config.model.name,
        "shapline.config_sha256": config.sha256(),
        IDENTITY_TAG: config.identity_sha256(),
        SELECTION_TAG: config.selection_sha256(),
        "shapline.config_path": str(Path(config_path).resolve()),
        "shapline.overrides": " ".join(overrides)[:4000],
        "mlflow.source.name": str(Path(config_path).resolve()),
        "mlflow.source.type": "JOB" if prefect.deployment else "LOCAL",
        "prefect.flow_run_id": prefect.flow_run_id,
    }
    if prefect.flow_run_url:
        tags["prefect.flow_run_url"] = prefect.flow_run_url
    if prefect.deployment:
        tags["prefect.deployment"] = prefect.deployment
    return tags


def model_tags(config: ExplainConfig, fingerprint: str) -> dict[str, str]:
    """Which model was explained: its file and sha256, or its endpoint (a registry model's tags come from the
    registry: shapline.model_uri, _name, _version, _run_id, _id)."""
    model = config.model
    if isinstance(model, SklearnModel | XGBoostModel):
        return {"shapline.model_file": model.path, "shapline.model_sha256": fingerprint}
    if isinstance(model, SageMakerModel):
        tags = {"shapline.endpoint": model.endpoint.name}
        if model.endpoint.region:
            tags["shapline.endpoint_region"] = model.endpoint.region
        return tags
    return {}


def run_params(config: ExplainConfig) -> dict[str, Any]:
    """The model, background and shard settings as MLflow params (the explainer's come with the plan)."""
    params: dict[str, Any] = {
        "model.kind": config.model.kind,
        "model.output": config.model.effective_output,
        "model.class_index": config.model.class_index,
    }
    for key, value in config.background.model_dump(mode="json").items():
        params[f"background.{key}"] = value
    for key, value in config.shards.model_dump(mode="json").items():
        if key == "address" and config.shards.runner != "dask":
            continue
        params[f"shards.{key}"] = value
    params["data.explain_rows"] = config.data.explain_rows
    if config.data.id_column is not None:
        params["data.id_column"] = config.data.id_column
    for key, value in config.monitor.model_dump(mode="json").items():
        params[monitor_param(key)] = value
    return params


def explainer_params(config: ExplainConfig, plan: RunPlan) -> dict[str, Any]:
    """The explainer's settings that apply to the explainer the run resolved, what it explained, in what units."""
    params: dict[str, Any] = {}
    for key, value in config.explainer.model_dump(mode="json").items():
        if key in _ONLY_FOR and plan.algorithm not in _ONLY_FOR[key]:
            continue
        if _ONLY_FOR_ESTIMATOR.get(key, config.explainer.estimator) != config.explainer.estimator:
            continue
        params[f"explainer.{key}"] = value
    if plan.algorithm not in ("tree", "linear"):
        params["explainer.link"] = config.link  # tree and linear explain the model's margin, whatever it is
    params["explainer.algorithm_effective"] = plan.algorithm
    params["explainer.link_effective"] = plan.link
    params["explainer.units"] = plan.explained[0].units
    labels = [e.label for e in plan.explained if e.label is not None]
    if len(labels) == 1:
        params["model.class_label"] = labels[0]
    else:
        params.update({f"model.class_label.{i}": label for i, label in enumerate(labels)})
    return params


def record_config(run: TrackedRun, config: ExplainConfig, folder: Path) -> None:
    """config.yaml (the resolved config, redacted) and the run's params."""
    path = folder / "config.yaml"
    path.write_text(redact(config.to_yaml()))
    log_artifact(run, path)
    log_values(run, params=run_params(config))


def _schema(frame: pd.DataFrame) -> str:
    """The frame's columns as MLflow's ColSpec schema JSON (what its own pandas datasets log), from dtypes."""
    from mlflow.types import ColSpec, DataType, Schema

    def kind(dtype: Any) -> DataType:
        if pd.api.types.is_bool_dtype(dtype):
            return DataType.boolean
        if pd.api.types.is_integer_dtype(dtype):
            return DataType.long
        if pd.api.types.is_float_dtype(dtype):
            return DataType.double
        if pd.api.types.is_datetime64_any_dtype(dtype):
            return DataType.datetime
        return DataType.string

    # Numbers in integer or boolean columns cannot be missing; any other column may hold NaN or None.
    schema = Schema(
        [
            ColSpec(kind(dtype), str(name), required=kind(dtype) in (DataType.long, DataType.boolean))
            for name, dtype in frame.dtypes.items()
        ]
    )
    return json.dumps({"mlflow_colspec": schema.to_dict()})


def _dataset(name: str, sha256: str, uri: str, frame: pd.DataFrame, context: str) -> Any:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source_type = uri.split("://", 1)[0] if "://" in uri else "local"
    profile = {"num_rows": len(frame), "num_elements": int(frame.size), "sha256": sha256}
    dataset = Dataset(
        name=name,
        digest=sha256[:DATASET_DIGEST_CHARS],
        source_type=source_type,
        source=json.dumps({"uri": redact(uri)}),
        schema=_schema(frame.head(0)),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset=dataset, tags=[InputTag("mlflow.data.context", context)])


def record_data(
    run: TrackedRun, config: ExplainConfig, data: LoadedData, fingerprint: str, identity: dict[str, str]
) -> None:
    """Which data and model the run read: tags (source, sha256s) and the data as an MLflow dataset input.

    A registry model's MLflow 3 logged model (`identity`'s shapline.model_id) becomes an input of the run,
    as an evaluation run's is, so the model's page leads to its explanations.
    """
    tags = {DATA_SHA256_TAG: data.sha256, DATA_SOURCE_TAG: data.uri}
    log_values(run, tags={**tags, **model_tags(config, fingerprint)})
    name = Path(data.uri.split("?", 1)[0]).name or data.uri
    model_id = identity.get("shapline.model_id")
    log_inputs(
        run, [_dataset(name, data.sha256, data.uri, data.frame, "explain")], [model_id] if model_id else []
    )


def record_validation(run: TrackedRun, check: DataCheck, folder: Path) -> None:
    """validation.json and the validation metrics (recorded before a failing run stops)."""
    path = folder / "validation.json"
    path.write_text(check.report.to_json())
    log_artifact(run, path)
    log_values(
        run,
        metrics={
            "validation_success": float(check.report.success),
            "validation_failures": float(len(check.report.failures)),
        },
    )


def record_plan(run: TrackedRun, config: ExplainConfig, plan: RunPlan, folder: Path) -> None:
    """background.parquet (uploaded with the plots) as a dataset input, the explainer's params, the estimate."""
    path = folder / "background.parquet"
    plan.background.to_frame().to_parquet(path)
    sha256 = file_sha256(path)
    uri = f"runs:/{run.run_id}/background.parquet"
    log_inputs(
        run, [_dataset(f"{config.model.name} background", sha256, uri, plan.background.frame, "background")]
    )
    metrics = {}
    if plan.estimate is not None:
        metrics = {
            "inference_rows": float(plan.estimate.inference_rows),
            "inference_requests": float(plan.estimate.inference_requests),
        }
    log_values(run, params=explainer_params(config, plan), metrics=metrics)


def traffic_sent(traffic: list[dict[str, float] | None]) -> dict[str, float]:
    """What went to an endpoint, summed over the flow's own calls and every shard: inference_*_sent metrics."""
    counted = [t for t in traffic if t]
    if not counted:
        return {}
    keys = dict.fromkeys(key for t in counted for key in t)
    sent = {key: sum(t.get(key, 0.0) for t in counted) for key in keys}
    if "max_request_bytes" in sent:
        sent["max_request_bytes"] = max(t.get("max_request_bytes", 0.0) for t in counted)
    # Rows the kernel explainer did not send: a synthetic row identical to one already in the call (an
    # endpoint's, or a local model's where rows repeat enough; a local model logs only this).
    saved = sent.pop("rows_saved", None)
    metrics = {f"inference_{key}_sent": value for key, value in sent.items()}
    if saved is not None:
        metrics["inference_rows_saved"] = saved
    return metrics


def record_values(run: TrackedRun, combined: Aggregate, folder: Path) -> None:
    """Upload the values table and global importance (the first, and largest, results)."""
    combined.importance.to_csv(folder / "global_importance.csv", index=False)
    for name in VALUES_ARTIFACTS:
        log_artifact(run, folder / name)
    if combined.accuracy is not None and combined.accuracy.errors_path is not None:
        log_artifact(run, combined.accuracy.errors_path)


def description(
    config: ExplainConfig,
    check: DataCheck,
    plan: RunPlan,
    summary: RunSummary,
    prefect: PrefectContext,
    monitoring: Monitoring | None = None,
) -> str:
    """The run's description (mlflow.note.content, markdown): the paragraph a person reads first."""
    model = config.model
    t, code = markdown_text, markdown_code  # what the config and the data say: text, never markdown
    match model:
        case SklearnModel() | XGBoostModel():
            where = code(model.path)
        case MlflowModel():
            where = code(model.uri)
        case SageMakerModel():
            where = f"endpoint {code(model.endpoint.name)}"
    explained = plan.explained
    what = ", ".join(t(e.output) for e in explained)
    ranking = summary.ranking
    lines = [
        f"**{t(model.name)}** ({model.kind}, {where}) explained on {code(check.data.uri)} "
        f"({check.data.rows:,} rows, sha256 `{check.data.sha256[:12]}…`): "
        f"**{what}**, SHAP values in **{explained[0].units}**; {plan.algorithm} explainer, "
        f"{len(plan.background.frame)} background rows ({config.background.method}), "
        f"{summary.rows_explained:,} rows explained in {summary.shards} shard{'s' if summary.shards != 1 else ''}.",
        "",
    ]
    importance = summary.importance
    groups = importance.groupby(CLASS, sort=False) if CLASS in importance.columns else [(None, importance)]
    for label, part in groups:
        top = part.sort_values("rank").head(5)
        named = f" for {t(label)}" if label is not None else ""
        features = ", ".join(f"{t(row[FEATURE])} {row[ranking]:.3g}" for _, row in top.iterrows())
        lines.append(f"Top features{named} ({ranking}): {features}.")
    report = check.report
    validation = (
        f"validation passed, {report.counted()}"
        if report.success
        else f"validation: {len(report.failures)} failed (on_failure: warn) of {report.counted()}"
    )
    lines += ["", f"Checks: additivity max error {summary.additivity_max_error:.2g}; {validation}."]
    if accuracy := summary.accuracy_said():
        lines += ["", f"Accuracy: {t(accuracy)}."]
    if monitoring is not None and monitoring.comparison is not None:
        comparison = monitoring.comparison
        lines += ["", f"Drift: {t(comparison.sentence())}; top movers: {t(comparison.movers_text(3))}."]
        lines += ["", _baseline_said(monitoring.baseline, summary.tracking_uri)]
    elif monitoring is not None:
        lines += ["", f"Drift: no comparison ({t(monitoring.baseline.reason)})."]
    return redact("\n".join([*lines, "", _links_said(summary, prefect)]))


def _in_ui(page: str, tracking_uri: str) -> str:
    """A page of the store as the description links it: a server's URL; for a local store, the page within
    the MLflow UI showing the description (`#/experiments/...`), whatever port `mlflow ui` has."""
    return "#" + page.split("#", 1)[1] if open_hint(tracking_uri) else page


def _baseline_said(baseline: Baseline, tracking_uri: str) -> str:
    """Which run the baseline is, how it was chosen and what it explained, linked."""
    t = markdown_text
    named = f"[run {baseline.run_id}]({_in_ui(baseline.url, tracking_uri)})"
    return (
        f"Baseline: {named} ({t(baseline.run_name)}), {t(baseline.how_chosen)}: explained "
        f"{t(baseline.explained())}."
    )


def _links_said(summary: RunSummary, prefect: PrefectContext) -> str:
    """The report, the Prefect flow run, and for a local store how to open it."""
    links = []
    if summary.report:
        page = run_page(summary.tracking_uri, summary.experiment_id, summary.mlflow_run_id, summary.report)
        report = _in_ui(page, summary.tracking_uri)
        links.append(f"[{summary.report}]({report}): the page to open first")
    if prefect.flow_run_url:
        links.append(f"[Prefect flow run]({prefect.flow_run_url})")
    hint = open_hint(summary.tracking_uri)
    if hint:
        links.append(f"a local MLflow store: open it with {markdown_code(hint)}")
    return " · ".join(links)


def record_results(
    run: TrackedRun,
    config: ExplainConfig,
    check: DataCheck,
    plan: RunPlan,
    summary: RunSummary,
    traffic: dict[str, float],
    monitoring: Monitoring,
    prefect: PrefectContext,
    folder: Path,
) -> None:
    """The run's metrics (importance and drift included), its description and drift tags, and every
    artifact not uploaded yet (the report, drift.csv, the plots)."""
    metrics = {
        **summary.metrics(),
        **importance_metrics(summary.importance, summary.ranking),
        **traffic,
        **(ndcg_metrics(monitoring.comparison) if monitoring.comparison is not None else {}),
    }
    tags = {
        "mlflow.note.content": description(config, check, plan, summary, prefect, monitoring),
        **monitoring.tags(),
    }
    log_values(run, metrics=metrics, tags=tags)
    log_artifacts(run, folder, skip=(*VALUES_ARTIFACTS, ERRORS_FILE, "config.yaml"))
