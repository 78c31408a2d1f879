"""Which explainer a run uses, the space its values are in, and what it explained in words; kernel checks.

Resolved once per run (the plan) for every shard, so every worker explains the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from shapline.tasks.common.config import ExplainerConfig, effective_nsamples
from shapline.tasks.common.errors import ExplainError
from shapline.tasks.models.predictors import (
    Predictor,
    explained_outputs,
    is_pipeline,
    is_xgboost,
    output_labels,
)


def _is_linear(model: Any) -> bool:
    from sklearn.linear_model._base import LinearClassifierMixin, LinearModel

    return isinstance(model, (LinearClassifierMixin, LinearModel))


def _tree_output(model: Any) -> str | None:
    """What shap's TreeExplainer explains for this model ('log_odds', 'probability', 'raw'), None if it cannot."""
    import shap

    try:
        return str(shap.TreeExplainer(model).model.tree_output)
    except Exception:
        return None


def resolve_explainer(requested: str, predictor: Predictor, kernel_link: str) -> tuple[str, str]:
    """The explainer and the space its values are in, resolved once per run for every shard.

    Tree and linear explainers explain the model's margin (log-odds for a classifier), whatever
    link was configured; the model-agnostic ones explain in `kernel_link`.
    """
    native = predictor.native
    if requested in ("tree", "linear"):
        where = "a remote model" if native is None else type(native).__name__
        if native is None or is_pipeline(native):
            raise ExplainError(
                f"explainer.algorithm {requested} needs the model object itself, got {where}; use kernel"
            )
        if requested == "linear" and not _is_linear(native):
            raise ExplainError(f"explainer.algorithm linear needs a linear model, got {where}")
    if requested not in ("auto", "tree", "linear"):
        return requested, kernel_link
    if native is None or is_pipeline(native):
        return "kernel", kernel_link
    classifier = predictor.class_labels is not None
    if requested == "linear" or (requested == "auto" and _is_linear(native)):
        return "linear", "logit" if classifier else "identity"
    output = _tree_output(native)
    if output is None:
        if requested == "tree":
            raise ExplainError(
                f"explainer.algorithm tree: shap's TreeExplainer does not support {type(native).__name__}"
            )
        return "kernel", kernel_link
    return "tree", "logit" if output == "log_odds" else "identity"


@dataclass(frozen=True)
class ExplainedOutput:
    """One explained output in words: its class, the model output, and the units of its SHAP values."""

    label: str | None
    output: str
    short: str
    units: str


def explained_outputs_in_words(
    predictor: Predictor, width: int, class_index: int | None, method: str, task: str, link: str
) -> list[ExplainedOutput]:
    """What each explained output is (for the class column, params, titles and the run's description)."""
    classes = predictor.class_labels if task == "classification" else None
    indices = explained_outputs(width, class_index, classes)
    labels: list[str | None] = (
        list(output_labels(indices, classes)) if classes is not None else [None] * len(indices)
    )
    if link == "logit":
        units = "log-odds"
    elif method == "predict_proba":
        units = "probability"
    elif method == "decision_function":
        units = "raw margin"
    elif task == "regression":
        units = "units of the target"
    else:
        units = "model output"
    described = []
    for label in labels:
        named = label if label is not None else "the output"
        if method == "predict_proba":
            output, short = f"probability of {named}", f"P({named})"
        elif method == "decision_function":
            output, short = f"decision function of {named}", f"margin({named})"
        elif task == "regression":
            output, short = "prediction", "prediction"
        else:
            output, short = f"output for {named}", f"output({named})"
        described.append(ExplainedOutput(label=label, output=output, short=short, units=units))
    return described


def check_kernel_samples(config: ExplainerConfig, n_features: int) -> None:
    """Refuse explainer.nsamples too few for l1_reg to mean anything, before any compute.

    aic and bic fit LassoLarsIC on the 2 x nsamples augmented rows, which needs more rows than features
    + 1; the final weighted least squares needs at least as many coalitions as unknowns.
    """
    if n_features <= 1:
        return  # one feature is explained exactly, without a regression
    samples = effective_nsamples(config.nsamples, n_features)
    l1_reg = config.l1_reg
    if l1_reg in ("aic", "bic"):
        needed = (n_features + 1) // 2 + 1
    elif isinstance(l1_reg, str) and l1_reg.startswith("num_features("):
        needed = max(1, min(int(l1_reg[len("num_features(") : -1]), n_features) - 1)
    else:
        needed = n_features - 1
    if samples < needed:
        raise ExplainError(
            f"explainer.nsamples {config.nsamples} is too few for l1_reg {str(l1_reg).lower()} with "
            f"{n_features} features: it needs at least {needed} (aic and bic: more than (features + 1) / 2; "
            "false: features - 1; num_features(k): k - 1); raise nsamples, or use 'auto'"
        )


@dataclass(frozen=True)
class TreeUnread:
    """Columns shap's tree explainer cannot read for a model: the setting that decides it, why, what to do,
    and whether the reason is the model's (explainer.algorithm auto then explains it with kernel, which
    passes every column to the model untouched) rather than the config's."""

    setting: str
    reason: str
    advice: str
    models: bool

    def __str__(self) -> str:
        return f"{self.setting}: {self.reason}; {self.advice}"


def tree_cannot_read(config: ExplainerConfig, native: Any, frame: pd.DataFrame) -> TreeUnread | None:
    """Why shap's tree explainer cannot read these feature columns for this model; None when it can.

    With feature_perturbation interventional shap walks the trees with the background itself, as numbers;
    tree_path_dependent asks the model's own library, and only XGBoost's (enable_categorical) is known
    here to read categories that way: scikit-learn's trees get shap's array of numbers, where a category
    stops every shard on a cast.
    """
    unread = ", ".join(str(c) for c, t in frame.dtypes.items() if not pd.api.types.is_numeric_dtype(t))
    if not unread:
        return None
    if config.feature_perturbation == "interventional":
        return TreeUnread(
            "explainer.feature_perturbation interventional",
            f"shap's tree algorithm reads numbers only; non-numeric: {unread}",
            "use tree_path_dependent (the default) or explainer.algorithm kernel",
            models=False,
        )
    if is_xgboost(native):
        return None
    return TreeUnread(
        "explainer.algorithm tree",
        f"shap's TreeExplainer reads only numbers for {type(native).__name__}; non-numeric: {unread}",
        "use explainer.algorithm kernel (or auto)",
        models=True,
    )
