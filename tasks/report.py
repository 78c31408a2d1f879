"""The Prefect markdown artifact: the top features and where the MLflow run is."""

from __future__ import annotations

import re

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.redact import redact
from tasks.schemas import CLASS, FEATURE, RANK


def summary_markdown(
    model: str,
    importance: pd.DataFrame,
    aggregation: str,
    run_link: str,
    metrics: dict[str, float],
    top: int = 10,
) -> str:
    """Markdown: the top features by the ranking aggregation, the run's numbers and the MLflow link."""
    lines = [f"# SHAP explanation of `{model}`", "", f"MLflow run: {run_link}", ""]
    lines += [f"- **{key}**: {value:g}" for key, value in metrics.items()]
    groups = importance.groupby(CLASS, sort=False) if CLASS in importance.columns else [(None, importance)]
    for label, part in groups:
        lines += [
            "",
            f"## Top features{f' for class {label}' if label is not None else ''}",
            "",
            f"| rank | feature | {aggregation} |",
            "|---:|---|---:|",
        ]
        for _, row in part.sort_values(RANK).head(top).iterrows():
            lines.append(f"| {row[RANK]} | {row[FEATURE]} | {row[aggregation]:.4g} |")
    return "\n".join(lines) + "\n"


def artifact_key(model: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return "shapline-" + (re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-") or "model")


@task(name="publish-summary", cache_policy=NO_CACHE)
def publish_summary_task(model: str, markdown: str) -> None:
    """Publish the run summary as a Prefect markdown artifact."""
    create_markdown_artifact(
        key=artifact_key(model), markdown=redact(markdown), description=redact(f"SHAP summary of {model}")
    )
