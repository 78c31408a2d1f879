"""One preparation for `run`, `validate` and `--dry-run`: everything decided before any SHAP compute.

First the data check (load the data and the model, choose the features, validate), whose report a
run records before it stops on a failure; then the plan (the rows to explain, the background, the
probe of the model, the explainer and the space it explains in, the shards, and for an endpoint the
inference estimate), resolved once for every shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pandas as pd

from shapline.tasks.common.config import ExplainConfig, SageMakerModel
from shapline.tasks.common.errors import BudgetExceeded, ConfigError, ExplainError, ValidationFailed
from shapline.tasks.compute.shards import Shard, plan_shards
from shapline.tasks.data.background import Background, draw_background
from shapline.tasks.data.loading import (
    LoadedData,
    feature_columns,
    load_data,
    select_explain_rows,
    split_features,
)
from shapline.tasks.data.validation import ValidationReport, validate_frame
from shapline.tasks.explainers.choice import (
    ExplainedOutput,
    check_kernel_samples,
    explained_outputs_in_words,
    resolve_explainer,
    tree_cannot_read,
)
from shapline.tasks.explainers.explain import load_shap
from shapline.tasks.models.loading import link_for, load_predictor
from shapline.tasks.models.predictors import Predictor
from shapline.tasks.models.probe import (
    arrow_text_columns,
    probe_output,
    probe_rows,
    same_with_python_text,
    with_python_text,
)
from shapline.tasks.models.sagemaker.inference import InferenceEstimate, over_budget, plan_inference


@dataclass(frozen=True)
class DataCheck:
    """The data as read, the model as loaded, the features chosen, and what validation found."""

    data: LoadedData
    predictor: Predictor
    features: list[str]
    report: ValidationReport

    def without_frame(self) -> DataCheck:
        """This check with the data's rows let go (the flow does once they are staged for the shards)."""
        return replace(self, data=self.data.without_frame())

    def refusal(self) -> ValidationFailed | None:
        """The error that stops the run when validation found blocking failures, else None."""
        if not self.report.blocking:
            return None
        return ValidationFailed(f"validation of {self.data.uri} failed: " + "; ".join(self.report.blocking))


def check_data(config: ExplainConfig) -> DataCheck:
    """Read the data, load the model, choose the features and validate them with Great Expectations."""
    load_shap()  # first, while nothing big is on the stack its import would keep
    data = load_data(config.data)
    predictor = load_predictor(config.model)
    features = feature_columns(data.frame, config.data, predictor.feature_names)
    report = validate_frame(
        data.frame, features, config.validation, data.repeated_columns, config.data.id_column
    )
    return DataCheck(data=data, predictor=predictor, features=features, report=report)


@dataclass(frozen=True)
class RunPlan:
    """What a run will explain, and how, decided once before any SHAP compute."""

    rows: pd.DataFrame
    background: Background
    probe: pd.DataFrame
    outputs: int
    algorithm: str
    link: str
    explained: list[ExplainedOutput]
    shards: list[Shard]
    estimate: InferenceEstimate | None
    budget_problem: str | None
    # Why explainer.algorithm auto chose otherwise than the model alone would have it (said in the log).
    algorithm_said: str | None = None
    # Text columns the kernel gives the model as Python strings rather than pyarrow's (same outputs on the
    # probe rows; said in the log).
    python_text: list[str] = field(default_factory=list)

    @property
    def explain_rows(self) -> int:
        return sum(len(shard.row_ids) for shard in self.shards)

    def without_rows(self) -> RunPlan:
        """This plan with the rows to explain let go (empty, same columns and dtypes): they are staged."""
        return replace(self, rows=self.rows.iloc[:0].copy())

    def enforce_budget(self) -> None:
        """Refuse to start a run its endpoint budget (model.budget.max_inference_rows) does not allow."""
        if self.budget_problem is not None:
            raise BudgetExceeded(self.budget_problem)


def _check_class_labels(config: ExplainConfig, outputs: int) -> None:
    labels = config.model.class_labels
    if labels is not None and outputs > 1 and len(labels) != outputs:
        raise ConfigError(
            f"model.class_labels: {len(labels)} labels for a model with {outputs} outputs; give one per output"
        )


def plan_run(config: ExplainConfig, check: DataCheck) -> RunPlan:
    """The rows, background, explainer, link, shards and (for an endpoint) the inference estimate.

    The model is probed here, on the rows and background cells it is most likely to refuse, so a model
    that cannot take the data fails with one line naming the row before any shard starts.
    """
    refusal = check.refusal()
    if refusal is not None:
        raise refusal
    frame, target = split_features(check.data.frame, config.data, check.features)
    rows = select_explain_rows(frame, config.data.explain_rows, config.data.seed)
    background = draw_background(frame, target, config.background)
    probe = probe_rows(rows, background.frame)
    kernel_link = link_for(check.predictor, config.explainer.link, config.link, config.model.effective_output)
    output = probe_output(check.predictor, probe, config.model.class_index, kernel_link == "logit")
    outputs = int(output.shape[1])
    _check_class_labels(config, outputs)
    algorithm, link = resolve_explainer(config.explainer.algorithm, check.predictor, kernel_link)
    said = None
    if algorithm == "tree" and (unread := tree_cannot_read(config.explainer, check.predictor.native, frame)):
        if not (unread.models and config.explainer.algorithm == "auto"):
            raise ExplainError(str(unread))
        algorithm, link = "kernel", kernel_link  # auto: what explains any model with any columns
        said = f"explainer.algorithm auto: kernel, not tree ({unread.reason})"
    explained = explained_outputs_in_words(
        check.predictor, outputs, config.model.class_index, check.predictor.method, config.model.task, link
    )
    python_text: list[str] = []
    if algorithm == "kernel":
        check_kernel_samples(config.explainer, len(check.features))
        # A scikit-learn model that gives the same outputs for text held as Python strings is given it so:
        # the kernel's synthetic rows then cost it no conversion per call.
        if check.predictor.converts_text and same_with_python_text(check.predictor, probe, output):
            python_text = arrow_text_columns(rows)
            rows = with_python_text(rows)
            background = replace(background, frame=with_python_text(background.frame))
    shards = plan_shards(rows.index.to_numpy(), config.shards.size)
    estimate, problem = None, None
    if isinstance(config.model, SageMakerModel):
        estimate = plan_inference(
            config.model,
            rows,
            background.frame,
            config.explainer,
            algorithm,
            len(shards),
            probe_rows=len(probe),
        )
        problem = over_budget(config.model, estimate)
    return RunPlan(
        rows=rows,
        background=background,
        probe=probe,
        outputs=outputs,
        algorithm=algorithm,
        link=link,
        explained=explained,
        shards=shards,
        estimate=estimate,
        budget_problem=problem,
        algorithm_said=said,
        python_text=python_text,
    )
