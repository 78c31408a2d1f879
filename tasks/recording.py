"""What a run records in MLflow, step by step: tags, params, metrics and artifacts (their names are a contract)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shapline.tasks.aggregate import Aggregate
from shapline.tasks.config import ExplainConfig
from shapline.tasks.data import LoadedData
from shapline.tasks.plan import DataCheck, RunPlan
from shapline.tasks.redact import redact
from shapline.tasks.shards import ShardResult
from shapline.tasks.summary import RunSummary
from shapline.tasks.tracking import TrackedRun, log_artifact, log_artifacts, log_values

# Logged before the plots, so the largest artifact uploads while they render.
VALUES_ARTIFACTS = ("shap_values.parquet", "global_importance.csv")


def run_tags(
    config: ExplainConfig, config_path: str, overrides: list[str], flow_run_id: str
) -> dict[str, str]:
    """The tags a run starts with: the model, the config (hash, path, overrides) and the Prefect flow run."""
    return {
        "shapline.model": config.model.name,
        "shapline.config_sha256": config.sha256(),
        "shapline.config_path": str(Path(config_path).resolve()),
        "shapline.overrides": " ".join(overrides)[:4000],
        "prefect.flow_run_id": flow_run_id,
    }


def run_params(config: ExplainConfig) -> dict[str, Any]:
    """The explainer, background and shard settings as MLflow params."""
    params: dict[str, Any] = {
        "model.kind": config.model.kind,
        "model.output": config.model.effective_output,
        "model.class_index": config.model.class_index,
        "explainer.link": config.link,
    }
    for section in ("explainer", "background", "shards"):
        for key, value in getattr(config, section).model_dump(mode="json").items():
            params[f"{section}.{key}"] = value
    params["data.explain_rows"] = config.data.explain_rows
    return params


def record_config(run: TrackedRun, config: ExplainConfig, folder: Path) -> None:
    """config.yaml (the resolved config, redacted) and the run's params."""
    path = folder / "config.yaml"
    path.write_text(redact(config.to_yaml()))
    log_artifact(run, path)
    log_values(run, params=run_params(config))


def record_data(run: TrackedRun, data: LoadedData) -> None:
    """Which data the run read: its source and the sha256 of its bytes."""
    log_values(run, tags={"shapline.data_sha256": data.sha256, "shapline.data_source": data.uri})


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


def record_plan(run: TrackedRun, plan: RunPlan, folder: Path) -> None:
    """background.parquet (written now, uploaded with the plots), the inference estimate, the resolved explainer."""
    plan.background.to_frame().to_parquet(folder / "background.parquet")
    params = {"explainer.algorithm_effective": plan.algorithm, "explainer.link_effective": plan.link}
    metrics = {}
    if plan.estimate is not None:
        metrics = {
            "inference_rows": float(plan.estimate.inference_rows),
            "inference_requests": float(plan.estimate.inference_requests),
        }
    log_values(run, params=params, metrics=metrics)


def traffic_sent(traffic: list[dict[str, float] | None]) -> dict[str, float]:
    """What went to an endpoint, summed over the flow's own calls and every shard: inference_*_sent metrics."""
    counted = [t for t in traffic if t]
    if not counted:
        return {}
    sent = {key: sum(t[key] for t in counted) for key in counted[0]}
    sent["max_request_bytes"] = max(t["max_request_bytes"] for t in counted)
    return {f"inference_{key}_sent": value for key, value in sent.items()}


def record_values(run: TrackedRun, combined: Aggregate, folder: Path) -> None:
    """Upload the values table and global importance (the first, and largest, results)."""
    combined.importance.to_csv(folder / "global_importance.csv", index=False)
    for name in VALUES_ARTIFACTS:
        log_artifact(run, folder / name)


def record_results(
    run: TrackedRun,
    summary: RunSummary,
    computed: list[ShardResult],
    probe_traffic: dict[str, float] | None,
    folder: Path,
) -> None:
    """The run's metrics and everything else under `folder` (plots, background) not uploaded yet."""
    metrics = {**summary.metrics(), **traffic_sent([probe_traffic, *(r.traffic for r in computed)])}
    log_values(run, metrics=metrics)
    log_artifacts(run, folder, skip=(*VALUES_ARTIFACTS, "config.yaml"))
