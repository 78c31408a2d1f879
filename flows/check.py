"""`shapline validate`: check config, model and data with the same steps the flow runs, without explaining."""

from __future__ import annotations

from typing import Any

from flows.config import SageMakerModel, load_config
from tasks.background import draw_background
from tasks.data import feature_columns, load_data, select_explain_rows, split_features
from tasks.explain import check_kernel_samples, resolve_algorithm
from tasks.models import load_predictor, probe_predictor, probe_rows
from tasks.shards import plan_shards
from tasks.validation import validate_frame


def check_config(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Everything `run` checks before SHAP compute; `ok` is False when the run would stop."""
    config = load_config(config_path, overrides)
    lines = [f"config {config_path}: valid (model {config.model.name}, kind {config.model.kind})"]
    loaded = load_data(config.data)
    predictor = load_predictor(config.model)
    features = feature_columns(loaded.frame, config.data, predictor.feature_names)
    report = validate_frame(loaded.frame, features, config.validation, loaded.repeated_columns)
    lines.append(f"data {loaded.uri}: {len(loaded.frame)} rows, {len(features)} features")
    lines.append(f"validation: {report.evaluated} expectations, {len(report.failures)} failed")
    lines += [f"  {'FAIL' if line in report.blocking else 'warn'}: {line}" for line in report.failures]
    result: dict[str, Any] = {
        "ok": not report.blocking,
        "rows": len(loaded.frame),
        "features": features,
        "validation_success": report.success,
        "validation_failures": report.failures,
    }
    if report.blocking:
        lines.append("validation failed: the run would stop here")
        return {**result, "lines": lines}
    frame, target = split_features(loaded.frame, config.data, features)
    rows = select_explain_rows(frame, config.data.explain_rows, config.data.seed)
    background = draw_background(frame, target, config.background)
    probe = probe_rows(rows, background.frame)
    outputs = probe_predictor(predictor, probe, config.model.class_index)
    shards = plan_shards(rows.index, config.shards.size)
    algorithm = resolve_algorithm(config.explainer.algorithm, predictor)
    if algorithm == "kernel":
        check_kernel_samples(config.explainer, len(features))
    lines.append(
        f"model {config.model.name}: {predictor.method}() gives {outputs} output(s); explainer {algorithm}"
    )
    lines.append(
        f"plan: {len(rows)} rows to explain in {len(shards)} shards of <= {config.shards.size}, "
        f"background {len(background.frame)} rows ({config.background.method}), "
        f"{config.shards.workers} {config.shards.runner} workers"
    )
    result.update(
        explain_rows=len(rows), shards=len(shards), background_rows=len(background.frame), algorithm=algorithm
    )
    if isinstance(config.model, SageMakerModel):
        from tasks.endpoint import plan_inference

        estimate = plan_inference(
            config.model,
            rows,
            background.frame,
            config.explainer,
            algorithm,
            len(shards),
            probe_rows=len(probe),
        )
        limit = config.model.budget.max_inference_rows
        over = limit is not None and estimate["inference_rows"] > limit
        lines.append(
            f"endpoint {config.model.endpoint.name}: ~{int(estimate['inference_rows']):,} inference rows in "
            f"~{int(estimate['inference_requests']):,} requests (budget: {limit if limit else 'none'})"
            + (" OVER BUDGET: the run would refuse to start" if over else "")
        )
        result.update(
            ok=result["ok"] and not over,
            inference_rows=estimate["inference_rows"],
            inference_requests=estimate["inference_requests"],
        )
    return {**result, "lines": lines}
