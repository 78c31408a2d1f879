"""shapline's steps, each a plain typed function that runs and tests without Prefect (shapline.tasks).

Read them in the order a run uses them: config → plan (data, validation, background, explainer,
shards) → shards and runners (the SHAP compute) → aggregate → plots → recording and summary.
"""

from __future__ import annotations

from shapline.tasks.aggregate import Aggregate, aggregate
from shapline.tasks.background import Background, draw_background
from shapline.tasks.config import ExplainConfig, load_config
from shapline.tasks.data import LoadedData, load_data
from shapline.tasks.errors import ShaplineError
from shapline.tasks.explain import ShardValues, explain_rows
from shapline.tasks.models import load_predictor
from shapline.tasks.plan import DataCheck, RunPlan, check_data, plan_run
from shapline.tasks.plots import render_plots
from shapline.tasks.predictors import Predictor
from shapline.tasks.redact import redact
from shapline.tasks.summary import RunSummary
from shapline.tasks.validation import ValidationReport, validate_frame

__all__ = [
    "Aggregate",
    "Background",
    "DataCheck",
    "ExplainConfig",
    "LoadedData",
    "Predictor",
    "RunPlan",
    "RunSummary",
    "ShardValues",
    "ShaplineError",
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
