"""shapline: explain production models with SHAP on a schedule, every explanation kept in MLflow.

The installed package is `shapline`; its steps live in `shapline.tasks` (plain functions, no Prefect)
and the Prefect flow, CLI and deployments in `shapline.flows`. The names most people need:

    from shapline import load_config, check_data, plan_run, explain_model
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from shapline.flows.parameters import ExplainParameters
from shapline.tasks import (
    ExplainConfig,
    RunPlan,
    RunSummary,
    ShaplineError,
    check_data,
    load_config,
    plan_run,
)

try:
    __version__ = version("shapline")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"


def explain_model(parameters: ExplainParameters) -> RunSummary:
    """Run the Prefect flow (shapline.flows.explain.explain_model), imported when first called: Prefect is heavy."""
    from shapline.flows.explain import explain_model as flow

    return flow(parameters=parameters)


__all__ = [
    "ExplainConfig",
    "ExplainParameters",
    "RunPlan",
    "RunSummary",
    "ShaplineError",
    "__version__",
    "check_data",
    "explain_model",
    "load_config",
    "plan_run",
]
