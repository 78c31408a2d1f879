"""shapline's steps, each a plain typed function that runs and tests without Prefect (shapline.tasks).

Grouped by concern, and the layers point one way (each may import only those before it):

    common       the config, errors, redaction, escaping, schemas, process facts
    tracking     MLflow's client
    data         reading, validating, the background
    models       every model behind one Predictor (files, registry, SageMaker endpoints)
    explainers   the SHAP math and shapline's kernel engine
    compute      the plan, shard jobs and their store, runners
    monitoring   attribution drift: the maths and the baseline queries
    results      the values table, importance, plots, the report, the summary
    run          one run's resources, what it records, the monitor step

The names below are imported when first used (PEP 562): importing shapline.tasks, or one step, costs only
what that step needs, so a worker that computes shards never loads plotting, MLflow or Great Expectations.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it.
_PUBLIC = {
    "Aggregate": "results.aggregate",
    "aggregate": "results.aggregate",
    "Background": "data.background",
    "draw_background": "data.background",
    "ExplainConfig": "common.config",
    "load_config": "common.config",
    "ShaplineError": "common.errors",
    "redact": "common.redact",
    "LoadedData": "data.loading",
    "load_data": "data.loading",
    "ValidationReport": "data.validation",
    "validate_frame": "data.validation",
    "Predictor": "models.predictors",
    "load_predictor": "models.loading",
    "ShardValues": "explainers.explain",
    "explain_rows": "explainers.explain",
    "DataCheck": "compute.plan",
    "RunPlan": "compute.plan",
    "check_data": "compute.plan",
    "plan_run": "compute.plan",
    "render_plots": "results.plots",
    "RunSummary": "results.summary",
}

__all__ = [
    "Aggregate",
    "Background",
    "DataCheck",
    "ExplainConfig",
    "LoadedData",
    "Predictor",
    "RunPlan",
    "RunSummary",
    "ShaplineError",
    "ShardValues",
    "ValidationReport",
    "aggregate",
    "check_data",
    "draw_background",
    "explain_rows",
    "load_config",
    "load_data",
    "load_predictor",
    "plan_run",
    "redact",
    "render_plots",
    "validate_frame",
]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and editors see; nothing is imported at run time
    from shapline.tasks.common.config import ExplainConfig, load_config
    from shapline.tasks.common.errors import ShaplineError
    from shapline.tasks.common.redact import redact
    from shapline.tasks.compute.plan import DataCheck, RunPlan, check_data, plan_run
    from shapline.tasks.data.background import Background, draw_background
    from shapline.tasks.data.loading import LoadedData, load_data
    from shapline.tasks.data.validation import ValidationReport, validate_frame
    from shapline.tasks.explainers.explain import ShardValues, explain_rows
    from shapline.tasks.models.loading import load_predictor
    from shapline.tasks.models.predictors import Predictor
    from shapline.tasks.results.aggregate import Aggregate, aggregate
    from shapline.tasks.results.plots import render_plots
    from shapline.tasks.results.summary import RunSummary
