"""shapline: explain production models with SHAP on a schedule, every explanation kept in MLflow.

The installed package is `shapline`; its steps live in `shapline.tasks` (plain functions, no Prefect)
and the Prefect flow, CLI and deployments in `shapline.flows`. The names most people need:

    from shapline import load_config, check_data, plan_run, explain_model

Each is imported when first used, so importing `shapline` (as every worker process does) costs nothing.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("shapline")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"

# Public name -> the module that defines it.
_PUBLIC = {
    "ExplainConfig": "shapline.tasks.common.config",
    "load_config": "shapline.tasks.common.config",
    "ShaplineError": "shapline.tasks.common.errors",
    "RunPlan": "shapline.tasks.compute.plan",
    "check_data": "shapline.tasks.compute.plan",
    "plan_run": "shapline.tasks.compute.plan",
    "RunSummary": "shapline.tasks.results.summary",
    "ExplainParameters": "shapline.flows.parameters",
}


def explain_model(parameters: ExplainParameters) -> RunSummary:
    """Run the Prefect flow (shapline.flows.explain.explain_model), imported when first called: Prefect is heavy."""
    from shapline.flows.explain import explain_model as flow

    return flow(parameters=parameters)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


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

if TYPE_CHECKING:
    from shapline.flows.parameters import ExplainParameters
    from shapline.tasks.common.config import ExplainConfig, load_config
    from shapline.tasks.common.errors import ShaplineError
    from shapline.tasks.compute.plan import RunPlan, check_data, plan_run
    from shapline.tasks.results.summary import RunSummary
