"""What a finished run says about itself, once: the `--json` line, the MLflow metrics and the Prefect artifact."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from shapline.tasks.common.markup import markdown_code, markdown_text
from shapline.tasks.common.schemas import CLASS, FEATURE, RANK
from shapline.tasks.monitoring.drift import drift_sentence
from shapline.tasks.tracking.uris import open_hint, run_page


def accuracy_sentence(said: Mapping[str, Any]) -> str:
    """What a kernel run's estimator spent and how sure its values are, in the words every place uses (the
    CLI's summary, the run log, the MLflow description), from the summary's --json fields; "" otherwise."""
    if said.get("model_rows") is None:
        return ""
    spent = f"median {said['coalitions_per_row']:,.0f} coalitions per row, {said['model_rows']:,} model rows"
    if said.get("rows_unconverged") is None:
        return f"estimator shap: {spent}; no standard errors (explainer.estimator: adaptive gives them)"
    tolerance, worst = said.get("tolerance"), said.get("max_standard_error") or 0.0
    short = said["rows_unconverged"]
    if not short and not worst:
        return f"estimator adaptive: every value exact, standard error 0 ({spent})"
    if not short:
        return f"estimator adaptive: every row within tolerance {tolerance:g} ({spent}; largest standard error {worst:.3g})"
    return (
        f"estimator adaptive: {short:,} of {said['rows_explained']:,} rows spent nsamples without meeting "
        f"tolerance {tolerance:g} ({spent}; largest standard error {worst:.3g}); their values are kept with "
        "their standard errors: raise explainer.nsamples or explainer.tolerance for them to converge"
    )


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
    # What was explained, in words: `probability of Chinstrap, SHAP values in log-odds`.
    explained: str = ""
    # Why there was no baseline (None when there was one); monitor.max_importance_change and the features
    # over it ({"feature", "relative_change"}).
    baseline_reason: str | None = None
    max_importance_change: float | None = None
    importance_drift: list[dict[str, Any]] = field(default_factory=list)
    # Kernel runs: synthetic rows evaluated, the median coalitions per row; estimator adaptive: rows whose
    # tolerance did not hold within nsamples, and the largest standard error of any value.
    model_rows: int | None = None
    # Kernel runs: seconds inside the model's calls, summed over the workers (wall time; against
    # explain_s x workers, how much of the explain phase was the model's own), and the CPU time of the
    # threads that made them (an in-process model's own CPU where it runs on them: one thread).
    model_s: float | None = None
    model_cpu_s: float | None = None
    coalitions_per_row: float | None = None
    rows_unconverged: int | None = None
    max_standard_error: float | None = None
    # explainer.tolerance of an adaptive run (None otherwise).
    tolerance: float | None = None
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
            "model_s": None if self.model_s is None else round(self.model_s, 3),
            "model_cpu_s": None if self.model_cpu_s is None else round(self.model_cpu_s, 3),
            "rows_per_s": self.rows_per_s,
            "algorithm": self.algorithm,
            "link": self.link,
            "validation_success": self.validation_success,
            "top_features": self.top_features,
            "drift": self.drift,
            "attribution_ndcg": self.attribution_ndcg,
            "baseline_run_id": self.baseline_run_id,
            "ndcg_threshold": self.ndcg_threshold,
            "max_importance_change": self.max_importance_change,
            "importance_drift": self.importance_drift,
            "baseline_reason": self.baseline_reason,
            "explained": self.explained,
            **self.accuracy(),
            "tolerance": self.tolerance,
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
            **({} if self.model_s is None else {"model_s": round(self.model_s, 1)}),
            **({} if self.model_cpu_s is None else {"model_cpu_s": round(self.model_cpu_s, 1)}),
            "rows_per_s": round(self.rows_per_s, 2),
            "background_rows": float(self.background_rows),
            "shards_reused": float(self.shards_reused),
            "shards_computed": float(self.shards_computed),
            **{name: float(value) for name, value in self.accuracy().items() if value is not None},
        }

    def accuracy(self) -> dict[str, float | None]:
        """What the kernel estimator spent and how sure it is (None where it does not apply)."""
        return {
            "model_rows": self.model_rows,
            "coalitions_per_row": self.coalitions_per_row,
            "rows_unconverged": self.rows_unconverged,
            "max_standard_error": self.max_standard_error,
        }

    def accuracy_said(self) -> str:
        """The accuracy sentence (`accuracy_sentence`) of this run."""
        return accuracy_sentence(self.to_json())

    def drift_said(self) -> str:
        """The comparison with the baseline in the sentence every place says it in (`drift_sentence`)."""
        if self.attribution_ndcg is None:
            return f"no comparison: {self.baseline_reason}" if self.baseline_reason else ""
        moved = [(d["feature"], d["relative_change"]) for d in self.importance_drift]
        return drift_sentence(
            self.attribution_ndcg,
            self.ndcg_threshold,
            self.baseline_run_id,
            moved,
            self.max_importance_change,
        )

    def where_markdown(self) -> str:
        """The MLflow run's own page as a link (a local store: the page `mlflow ui` serves, and how to start it)."""
        page = run_page(self.tracking_uri, self.experiment_id, self.mlflow_run_id)
        hint = open_hint(self.tracking_uri)
        if not hint:
            return f"[Open the MLflow run]({page})"
        return (
            f"MLflow run {markdown_code(self.mlflow_run_id)} in a local store: start {markdown_code(hint)}, then "
            f"open [the run]({page})"
        )

    def markdown(self, top: int = 10) -> str:
        """The Prefect markdown artifact: the run's numbers, the top features by the ranking aggregation."""
        t = markdown_text  # names from the config and the data: text, never markdown
        lines = [
            f"# SHAP explanation of {t(self.model)}",
            "",
            *([f"Explained: **{t(self.explained)}**.", ""] if self.explained else []),
            self.where_markdown(),
            "",
        ]
        lines += [f"- **{key}**: {value:g}" for key, value in self.metrics().items()]
        if self.attribution_ndcg is not None:
            lines.append(f"- **attribution_ndcg**: {t(self.drift_said())}")
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
