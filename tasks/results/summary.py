"""What a finished run says about itself, once: the `--json` line, the MLflow metrics and the Prefect artifact."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from shapline.tasks.common.markup import markdown_code, markdown_text
from shapline.tasks.common.schemas import CLASS, FEATURE, RANK
from shapline.tasks.monitoring.drift import drift_sentence


class Phases:
    """Seconds per phase of a run: `lap(name)` ends the phase that began at the last lap."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._last, 3)
        self._last = now


@dataclass(frozen=True)
class RunSummary:
    """One finished run: where it is logged, what it explained, what it cost."""

    mlflow_run_id: str
    experiment_id: str
    experiment: str
    tracking_uri: str
    run_url: str
    model: str
    rows_explained: int
    shards: int
    shards_reused: int
    shards_computed: int
    background_rows: int
    additivity_max_error: float
    duration_s: float
    explain_s: float
    algorithm: str
    link: str
    validation_success: bool
    importance: pd.DataFrame = field(repr=False)
    ranking: str = "mean_abs"
    status: str = "FINISHED"
    # The run's report artifact (report.html), when it has one.
    report: str | None = None
    # Against the baseline (monitor:): None when there was none to compare with.
    drift: bool | None = None
    attribution_ndcg: float | None = None
    baseline_run_id: str | None = None
    ndcg_threshold: float | None = None
    # Seconds per phase of the run, in order (the report's checks).
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        """Rows explained per second of the sharded SHAP phase."""
        return self.rows_explained / max(self.explain_s, 1e-9)

    @property
    def top_features(self) -> list[str]:
        """The five most important features (by the ranking aggregation, over every class)."""
        return self.importance.sort_values(RANK)[FEATURE].drop_duplicates().head(5).tolist()

    def to_json(self) -> dict[str, Any]:
        """The `--json` object (its field names are a contract: scripts read them)."""
        return {
            "status": self.status,
            "mlflow_run_id": self.mlflow_run_id,
            "experiment_id": self.experiment_id,
            "experiment": self.experiment,
            "tracking_uri": self.tracking_uri,
            "run_url": self.run_url,
            "rows_explained": self.rows_explained,
            "shards": self.shards,
            "shards_reused": self.shards_reused,
            "shards_computed": self.shards_computed,
            "additivity_max_error": self.additivity_max_error,
            "duration_s": round(self.duration_s, 3),
            "explain_s": round(self.explain_s, 3),
            "rows_per_s": self.rows_per_s,
            "algorithm": self.algorithm,
            "link": self.link,
            "validation_success": self.validation_success,
            "top_features": self.top_features,
            "drift": self.drift,
            "attribution_ndcg": self.attribution_ndcg,
            "baseline_run_id": self.baseline_run_id,
            "ndcg_threshold": self.ndcg_threshold,
            "report": self.report,
        }

    def metrics(self) -> dict[str, float]:
        """The run's MLflow metrics (names are a contract)."""
        return {
            "rows_explained": float(self.rows_explained),
            "shards": float(self.shards),
            "additivity_max_error": self.additivity_max_error,
            # Seconds to a tenth and rates to a hundredth: what a person reads in the MLflow UI.
            "duration_s": round(self.duration_s, 1),
            "explain_s": round(self.explain_s, 1),
            "rows_per_s": round(self.rows_per_s, 2),
            "background_rows": float(self.background_rows),
            "shards_reused": float(self.shards_reused),
            "shards_computed": float(self.shards_computed),
        }

    def markdown(self, top: int = 10) -> str:
        """The Prefect markdown artifact: the run's numbers, the top features by the ranking aggregation."""
        t = markdown_text  # names from the config and the data: text, never markdown
        lines = [
            f"# SHAP explanation of {t(self.model)}",
            "",
            f"MLflow run: {markdown_code(self.run_url)}",
            "",
        ]
        lines += [f"- **{key}**: {value:g}" for key, value in self.metrics().items()]
        if self.attribution_ndcg is not None:
            said = drift_sentence(self.attribution_ndcg, self.ndcg_threshold, self.baseline_run_id)
            lines.append(f"- **attribution_ndcg**: {t(said)}")
        importance = self.importance
        groups = (
            importance.groupby(CLASS, sort=False) if CLASS in importance.columns else [(None, importance)]
        )
        for label, part in groups:
            lines += [
                "",
                f"## Top features{f' for class {t(label)}' if label is not None else ''}",
                "",
                f"| rank | feature | {self.ranking} |",
                "|---:|---|---:|",
            ]
            for _, row in part.sort_values(RANK).head(top).iterrows():
                lines.append(f"| {row[RANK]} | {t(row[FEATURE])} | {row[self.ranking]:.4g} |")
        return "\n".join(lines) + "\n"
