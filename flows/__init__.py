"""shapline's Prefect side (shapline.flows): the flow that wires the steps, the CLI, deployments, the demo."""

from __future__ import annotations

from shapline.flows.parameters import ExplainParameters

__all__ = ["ExplainParameters"]
