"""`shapline validate` and `run --dry-run`: the run's own preparation (shapline.tasks.compute.plan), reported, no SHAP."""

from __future__ import annotations

from typing import Any

from shapline.flows.deploy import check_schedule
from shapline.tasks.common.config import SageMakerModel, load_config
from shapline.tasks.compute.plan import check_data, plan_run
from shapline.tasks.data.loading import explain_rows_said
from shapline.tasks.models.loading import trusted_code_warning


def check_config(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Everything `run` checks before SHAP compute; `ok` is False when the run would stop."""
    config = load_config(config_path, overrides)
    check_schedule(config, config_path)
    lines = [f"config {config_path}: valid (model {config.model.name}, kind {config.model.kind})"]
    if (warning := trusted_code_warning(config.model)) is not None:
        lines.append(f"warning: {warning}")
    check = check_data(config)
    report = check.report
    lines.append(f"data {check.data.uri}: {check.data.rows} rows, {len(check.features)} features")
    lines.append(f"validation: {report.counted()}; {len(report.failures)} failed")
    lines += [f"  {'FAIL' if line in report.blocking else 'warn'}: {line}" for line in report.failures]
    result: dict[str, Any] = {
        "ok": not report.blocking,
        "rows": check.data.rows,
        "features": check.features,
        "validation_success": report.success,
        "validation_failures": report.failures,
    }
    if report.blocking:
        lines.append("validation failed: the run would stop here")
        return {**result, "lines": lines}
    plan = plan_run(config, check)
    explained = "; ".join(f"{e.output}, SHAP values in {e.units}" for e in plan.explained)
    lines.append(
        f"model {config.model.name}: {check.predictor.method}() gives {plan.outputs} output(s); "
        f"explainer {plan.algorithm}: {explained}"
    )
    if (more := explain_rows_said(config.data.explain_rows, check.data.rows)) is not None:
        lines.append(more)
    shards_word = "shard" if len(plan.shards) == 1 else "shards"
    lines.append(
        f"plan: {plan.explain_rows} rows to explain in {len(plan.shards)} {shards_word} of <= {config.shards.size}, "
        f"background {len(plan.background.frame)} rows ({config.background.method}), "
        f"{config.shards.workers} {config.shards.runner} workers"
    )
    result.update(
        explain_rows=plan.explain_rows,
        shards=len(plan.shards),
        background_rows=len(plan.background.frame),
        algorithm=plan.algorithm,
    )
    if isinstance(config.model, SageMakerModel) and plan.estimate is not None:
        limit = config.model.budget.max_inference_rows
        lines.append(
            f"endpoint {config.model.endpoint.name}: ~{plan.estimate.inference_rows:,} inference rows in "
            f"~{plan.estimate.inference_requests:,} requests (budget: {limit if limit else 'none'})"
            + (" OVER BUDGET: the run would refuse to start" if plan.budget_problem else "")
        )
        result.update(
            ok=result["ok"] and plan.budget_problem is None,
            inference_rows=plan.estimate.inference_rows,
            inference_requests=plan.estimate.inference_requests,
        )
    return {**result, "lines": lines}
