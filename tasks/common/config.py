"""The per-model YAML config: one strict, frozen pydantic model, validated once at the flow's door.

The bottom layer: every step receives the section it needs, and this module imports only pydantic,
yaml and the errors.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from shapline.tasks.common.errors import ConfigError, one_line
from shapline.tasks.common.redact import redact


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


# numpy's and scikit-learn's seeds are 32-bit unsigned: a seed outside this range fails deep in a library.
MAX_SEED = 2**32 - 1


def _seed(what: str) -> Any:
    return Field(0, ge=0, le=MAX_SEED, description=what)


def _unique(values: list[str] | None, what: str) -> list[str] | None:
    repeated = sorted({v for v in values or [] if (values or []).count(v) > 1})
    if repeated:
        raise ValueError(f"{', '.join(map(repr, repeated))} listed more than once in {what}")
    return values


class _ModelBase(_Strict):
    name: str = Field(
        min_length=1,
        max_length=200,
        description="Model name: names the MLflow experiment and the Prefect deployment, and tags the run.",
    )
    task: Literal["classification", "regression"] = Field(
        "classification", description="classification | regression"
    )
    output: Literal["predict_proba", "predict", "decision_function"] | None = Field(
        None,
        description="Which model output to explain; default predict_proba for classification, predict otherwise.",
    )
    class_index: int | None = Field(
        1, ge=0, description="Which class (output column) to explain; null explains every class."
    )
    class_labels: list[str] | None = Field(
        None,
        min_length=1,
        description="A name for each output column (class), in order, for models that do not say "
        "(an endpoint); default: the model's classes_.",
    )

    @field_validator("class_labels")
    @classmethod
    def _labels_once(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not label.strip() for label in value):
            raise ValueError("a class label is empty")
        return _unique(value, "model.class_labels")

    @property
    def effective_output(self) -> str:
        """The output method actually called: the configured one, or the task's natural default."""
        if self.output is not None:
            return self.output
        return "predict_proba" if self.task == "classification" else "predict"


_SHA256 = r"^[0-9a-f]{64}$"


def _file_sha256_field() -> Any:
    return Field(
        None,
        pattern=_SHA256,
        description="The model file's sha256 (64 hex characters): a file with other bytes is refused. Default: "
        "taken when the run starts, so every shard explains the same model even if the file is replaced.",
    )


class SklearnModel(_ModelBase):
    """Any scikit-learn estimator or Pipeline saved with joblib or pickle."""

    kind: Literal["sklearn"]
    path: str = Field(description="joblib/pickle file, relative to the YAML file's folder.")
    sha256: str | None = _file_sha256_field()


class XGBoostModel(_ModelBase):
    """An XGBoost Booster (.json/.ubj) or a pickled XGBoost scikit-learn wrapper."""

    kind: Literal["xgboost"]
    path: str = Field(description=".json/.ubj booster or joblib/pickle wrapper, relative to the YAML.")
    sha256: str | None = _file_sha256_field()


class EndpointConfig(_Strict):
    name: str = Field(min_length=1, description="SageMaker endpoint name.")
    region: str | None = Field(None, description="AWS region; default: boto3's usual chain.")
    endpoint_url: str | None = Field(
        None, description="Override, e.g. http://127.0.0.1:8080 for a local endpoint."
    )
    content_type: Literal["text/csv", "application/jsonlines"] = Field(
        "text/csv", description="Request body format."
    )
    accept: Literal["text/csv", "application/jsonlines", "application/json"] = Field(
        "text/csv", description="Response format asked for."
    )
    score_column: int | str = Field(
        1, description="CSV: the column of each response line holding the score; JSON: the key name."
    )
    max_payload_mb: float = Field(
        5.0, gt=0, le=6.0, description="Each request body stays under this many MB."
    )
    max_rows_per_request: int | None = Field(
        None, ge=1, description="Optional extra cap on rows per request."
    )
    max_concurrency: int = Field(8, ge=1, description="Requests in flight at once (shared by all shards).")
    timeout_s: float = Field(60.0, gt=0, description="Read timeout of one request.")
    delete_after_run: bool = Field(False, description="Delete the endpoint when the run ends.")


class BudgetConfig(_Strict):
    max_inference_rows: int | None = Field(
        None, ge=1, description="Refuse to start when the estimated inference rows are above this."
    )


class SageMakerModel(_ModelBase):
    """A model behind a SageMaker (or SageMaker-protocol) endpoint, called through boto3."""

    kind: Literal["sagemaker"]
    endpoint: EndpointConfig
    budget: BudgetConfig = Field(default_factory=BudgetConfig)


class MlflowModel(_ModelBase):
    """A model in the MLflow registry or a run: models:/name/3, models:/name@alias, runs:/<id>/model."""

    kind: Literal["mlflow"]
    uri: str = Field(description="models:/name/version, models:/name@alias or runs:/<run_id>/path.")
    tracking_uri: str | None = Field(None, description="Where the registry is; default: output.tracking_uri.")


ModelConfig = Annotated[
    SklearnModel | XGBoostModel | SageMakerModel | MlflowModel, Field(discriminator="kind")
]
# The model kinds, declared once (above): whatever lists the kinds derives from this.
MODEL_KINDS: tuple[type[_ModelBase], ...] = typing.get_args(typing.get_args(ModelConfig)[0])


def kind_name(model: type[_ModelBase]) -> str:
    """The `model.kind` value of a model config class."""
    return str(typing.get_args(model.model_fields["kind"].annotation)[0])


class S3Config(_Strict):
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. MinIO or moto.")
    region: str | None = Field(None, description="AWS region; default: boto3's usual chain.")


class DataConfig(_Strict):
    source: str = Field(
        description=".csv or .parquet: a path relative to the YAML's folder, or s3://bucket/key."
    )
    s3: S3Config = Field(default_factory=S3Config, description="Options for s3:// sources.")
    target: str | None = Field(None, description="Target column, dropped before explaining.")
    drop: list[str] = Field(default_factory=list, description="Columns dropped before explaining.")
    features: list[str] | None = Field(None, description="Explicit feature list, in model order.")
    explain_rows: Annotated[int, Field(ge=1)] | Literal["all"] = Field(
        "all", description="How many rows to explain (sampled with data.seed), or all."
    )
    seed: int = _seed("Seed for sampling the rows to explain (0 to 2^32 - 1).")
    id_column: str | None = Field(
        None,
        min_length=1,
        description="Column that identifies a row (kept out of the features, validated unique and non-null); "
        "carried in shap_values.parquet beside row_id, names rows in plots and the report.",
    )

    @field_validator("id_column")
    @classmethod
    def _not_a_values_column(cls, value: str | None) -> str | None:
        if value in ("row_id", "class", "base_value", "model_output"):
            raise ValueError(f"{value!r} is a column of shap_values.parquet; name the data's own id column")
        return value

    @model_validator(mode="after")
    def _id_is_not_a_feature(self) -> DataConfig:
        if self.id_column is not None:
            if self.features is not None and self.id_column in self.features:
                raise ValueError(
                    f"id_column {self.id_column!r} is also in data.features; an id is not a feature"
                )
            if self.id_column == self.target:
                raise ValueError(f"id_column {self.id_column!r} is also data.target")
        return self

    @field_validator("features", "drop")
    @classmethod
    def _each_column_once(cls, value: list[str] | None) -> list[str] | None:
        return _unique(value, "the list")


class ValidationConfig(_Strict):
    on_failure: Literal["fail", "warn"] = Field("fail", description="fail stops the flow; warn goes on.")
    expectations: list[dict[str, dict[str, Any]]] = Field(
        default_factory=list,
        description="Great Expectations expectations, each `- expectation_name: {kwargs}`.",
    )

    @field_validator("expectations")
    @classmethod
    def _one_name_each(cls, value: list[dict[str, dict[str, Any]]]) -> list[dict[str, dict[str, Any]]]:
        for position, item in enumerate(value):
            if len(item) != 1:
                raise ValueError(
                    f"item {position} must have exactly one expectation name as its key, got {sorted(item)}"
                )
            name = next(iter(item))
            if not re.fullmatch(r"expect_[a-z0-9_]+", name):
                raise ValueError(f"item {position}: {name!r} is not an expectation name (expect_...)")
        return value


class BackgroundConfig(_Strict):
    method: Literal["random", "kmeans", "stratified", "all"] = Field(
        "random", description="random | kmeans | stratified | all"
    )
    size: int = Field(50, ge=1, description="Rows (or k-means centres) in the background sample.")
    seed: int = _seed("Seed for drawing the background (0 to 2^32 - 1).")


_L1_REG = re.compile(r"aic|bic|num_features\(\d+\)")


def effective_nsamples(nsamples: int | str, n_features: int) -> int:
    """Coalitions per row as shap's KernelExplainer uses them: auto is 2M + 2048, capped at 2**M - 2 (what
    explainer.nsamples means, for the explainers and for the estimate of what an endpoint will be sent)."""
    wanted = 2 * n_features + 2**11 if nsamples == "auto" else int(nsamples)
    if n_features <= 30:
        wanted = min(wanted, 2**n_features - 2)
    return max(wanted, 0)


class ExplainerConfig(_Strict):
    algorithm: Literal["auto", "tree", "kernel", "permutation", "exact", "linear"] = Field(
        "auto",
        description="auto picks tree for tree models, linear for linear models, kernel otherwise.",
    )
    link: Literal["identity", "logit"] | None = Field(
        None, description="Default: logit for classification probabilities, else identity."
    )
    nsamples: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="Kernel explainer coalitions per row: auto (2M + 2048) or an int; the budget cap for "
        "estimator adaptive.",
    )
    estimator: Literal["shap", "adaptive"] = Field(
        "shap",
        description="Kernel only: shap (shap's KernelExplainer, values equal to shap's for the same seeds) or "
        "adaptive (exact when every coalition fits nsamples, else exactly enumerated small and large coalitions "
        "and paired sampling of the rest until explainer.tolerance holds; a standard error for every value).",
    )
    tolerance: float = Field(
        0.005,
        gt=0,
        lt=1,
        description="estimator adaptive: a row is done when its largest standard error is at most this times "
        "the spread (max - min) of its values, or nsamples is spent.",
    )
    l1_reg: str | bool = Field(
        "aic",
        description="Kernel feature selection: aic | bic | num_features(k) | false (estimator shap only).",
    )
    seed: int = _seed("Seed of the sampling explainers; each row derives its own from it (0 to 2^32 - 1).")
    batch_rows: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="Kernel only: rows of a shard explained together, their model calls merged into one "
        "predict (fewer, fuller endpoint requests); values equal up to the model's rounding. auto: for "
        "endpoints as many rows (up to 16) as fit one request together; for in-process models as many as "
        "make the model's fixed cost per call small, timed on the first call, and at least as many as fit 4 MB "
        "of synthetic rows (a Pipeline's are merged; XGBoost's are one row each when one row's call is that "
        "large).",
    )
    additivity_tolerance: float = Field(
        0.01,
        gt=0,
        description="The run fails when a row's base_value + sum of SHAP values misses its model output by more "
        "than this times max(1, |model output|): values that do not add up do not explain the output.",
    )
    feature_perturbation: Literal["tree_path_dependent", "interventional"] = Field(
        "tree_path_dependent",
        description="Tree explainer only: tree_path_dependent (the model's own library: XGBoost's categories "
        "too), or interventional over the background (numeric features only).",
    )

    @model_validator(mode="after")
    def _l1_reg_is_shaps(self) -> ExplainerConfig:
        # adaptive solves the whole regression with its constraint: no feature selection. Refused only when
        # set (the default, aic, is shap's, and a config that names no l1_reg has nothing to refuse).
        if self.estimator == "adaptive" and "l1_reg" in self.model_fields_set and self.l1_reg is not False:
            raise ValueError(
                f"explainer.l1_reg {self.l1_reg!r} is for estimator shap; estimator adaptive selects no features "
                "(set l1_reg: false or leave it out)"
            )
        return self

    @property
    def effective_l1_reg(self) -> str | bool:
        """The feature selection the kernel explainer applies: l1_reg for shap, none for adaptive."""
        return self.l1_reg if self.estimator == "shap" else False

    @field_validator("l1_reg")
    @classmethod
    def _known_l1_reg(cls, value: str | bool) -> str | bool:
        if value is True or (isinstance(value, str) and not _L1_REG.fullmatch(value)):
            raise ValueError(f"expected aic, bic, num_features(k) or false, got {value!r}")
        if isinstance(value, str) and value.startswith("num_features(") and int(value[13:-1]) < 1:
            # Zero features selected: every value would be 0 and none would add up to the output.
            raise ValueError(f"num_features(k) selects k >= 1 features, got {value!r}")
        return value


class ShardsConfig(_Strict):
    size: int = Field(100, ge=1, description="Rows per shard; each shard is one Prefect task.")
    runner: Literal["thread", "process", "dask"] = Field("thread", description="thread | process | dask")
    workers: int = Field(
        2, ge=1, description="Shards explained at once (dask without address: local worker processes)."
    )
    address: str | None = Field(
        None,
        description="dask only: scheduler of an existing cluster, e.g. tcp://10.0.0.5:8786; null starts a local one.",
    )
    cache_dir: str | None = Field(
        None,
        description="Where finished shards are kept so a re-run after a crash recomputes only the missing ones; "
        "default: $SHAPLINE_CACHE_DIR, else ~/.cache/shapline/shards. Must be shared storage for a remote cluster.",
    )
    keep: bool = Field(
        False, description="Keep the finished shards after a successful run (default: delete them)."
    )
    timeout_s: float = Field(
        3600.0,
        gt=0,
        description="Seconds one shard may take (each try); past it the shard fails as a fault, is retried, "
        "and the run fails naming the shard. Raise it for slow models or large shards.",
    )

    @model_validator(mode="after")
    def _address_needs_dask(self) -> ShardsConfig:
        if self.address is not None and self.runner != "dask":
            raise ValueError("shards.address needs shards.runner dask")
        return self


Plot = Literal["bar", "beeswarm", "waterfall", "force", "categories"]
Aggregation = Literal["mean_abs", "mean", "median", "mean_sq", "std", "max_abs"]
ALL_PLOTS: tuple[Plot, ...] = ("bar", "beeswarm", "waterfall", "force", "categories")
DEFAULT_AGGREGATIONS: tuple[Aggregation, ...] = ("mean_abs", "mean", "median", "mean_sq", "std")


class OutputConfig(_Strict):
    tracking_uri: str | None = Field(
        None, description="Default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working folder."
    )
    experiment: str | None = Field(None, description="Default: shapline/<model.name>.")
    plots: list[Plot] = Field(
        default_factory=lambda: list(ALL_PLOTS),
        description="Plots logged under plots/: bar, beeswarm, waterfall, force, categories (the mean SHAP "
        "value of each value of a text or categorical feature).",
    )
    top_k: int = Field(
        10,
        ge=0,
        description="Waterfall plots for the top_k rows by model output, and as many for the lowest outputs and "
        "for the outputs nearest the decision threshold (P = 0.5, log-odds or margin 0).",
    )
    aggregations: list[Aggregation] = Field(
        default_factory=lambda: list(DEFAULT_AGGREGATIONS),
        min_length=1,
        description="Columns of global_importance.csv; the first one ranks the features.",
    )


class ScheduleConfig(_Strict):
    cron: str | None = Field(None, description="Cron expression, e.g. '0 6 * * 1' (06:00 every Monday).")
    interval_s: int | None = Field(
        None, ge=1, description="Or a fixed interval in seconds (overlapping runs share finished shards)."
    )
    timezone: str = Field("UTC", description="IANA timezone of the cron expression.")
    active: bool = Field(True, description="false keeps the deployment but pauses the schedule.")
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="Flow parameter overrides for scheduled runs (e.g. explain_rows: 1000).",
    )

    @model_validator(mode="after")
    def _one_trigger(self) -> ScheduleConfig:
        if (self.cron is None) == (self.interval_s is None):
            raise ValueError("schedule needs exactly one of cron or interval_s")
        return self


# An MLflow run id: 32 lowercase hex characters.
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# monitor.baseline's words (or else a run id).
BASELINE_CHOICES = ("previous", "reference", "none")


class MonitorConfig(_Strict):
    """Attribution drift against a baseline run: the previous comparable one, the model's pinned reference,
    or one named by its MLflow run id."""

    baseline: str = Field(
        "previous",
        description="previous (the latest FINISHED run of this model with the same settings and the same rows: "
        "data.source, explain_rows, seed, id_column), reference (the run pinned with `shapline reference "
        "RUN_ID`), none, or an MLflow run id.",
    )
    ndcg_threshold: float = Field(
        0.90, gt=0, le=1, description="attribution_ndcg below this is drift (SageMaker Clarify's default)."
    )
    max_importance_change: float | None = Field(
        None,
        gt=0,
        description="Also drift when a feature's importance (mean |SHAP value|) changed by more than this "
        "fraction of its baseline importance (0.5: by half), even when NDCG holds; features below 1% of the "
        "largest importance in both runs are not judged. null: NDCG only.",
    )
    on_drift: Literal["warn", "fail"] = Field(
        "warn",
        description="warn: a warning, exit 0; fail: the flow run Failed, exit 3 (MLflow run FINISHED).",
    )

    @field_validator("baseline")
    @classmethod
    def _previous_none_or_run_id(cls, value: str) -> str:
        if value in BASELINE_CHOICES or _RUN_ID.match(value):
            return value
        raise ValueError(
            f"expected previous, reference, none or an MLflow run id (32 hex characters), got {excerpt(value)}"
        )


class ExplainConfig(_Strict):
    """Everything one explanation run needs; the YAML file's top-level keys."""

    model: ModelConfig
    data: DataConfig
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    background: BackgroundConfig = Field(default_factory=BackgroundConfig)
    explainer: ExplainerConfig = Field(default_factory=ExplainerConfig)
    shards: ShardsConfig = Field(default_factory=ShardsConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    schedule: ScheduleConfig | None = Field(None, description="When `shapline deploy` schedules this model.")

    @model_validator(mode="after")
    def _consistent(self) -> ExplainConfig:
        if self.background.method == "stratified" and self.data.target is None:
            raise ValueError("background.method stratified needs data.target (the column to stratify by)")
        if self.background.method == "stratified" and self.model.task == "regression":
            raise ValueError(
                "background.method stratified draws by class; a regression target has none (every value would be "
                "its own class): use random or kmeans"
            )
        if self.model.task == "regression" and self.explainer.link == "logit":
            raise ValueError("explainer.link logit needs model.task classification")
        return self

    @property
    def link(self) -> str:
        """The link function: configured, or logit for classification probabilities."""
        if self.explainer.link is not None:
            return self.explainer.link
        wants_logit = self.model.task == "classification" and self.model.effective_output == "predict_proba"
        return "logit" if wants_logit else "identity"

    @property
    def experiment_name(self) -> str:
        """The MLflow experiment: configured, or shapline/<model.name>; redacted (a name is shown everywhere,
        so a token typed into it is not kept)."""
        return redact(self.output.experiment or f"shapline/{self.model.name}")

    def to_yaml(self) -> str:
        """The resolved config (defaults filled, paths absolute) as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def values_sha256(self) -> str:
        """A hash of what determines the SHAP values, not where they go or how many workers compute them."""
        parts = {
            name: getattr(self, name).model_dump(mode="json")
            for name in ("model", "data", "background", "explainer")
        }
        if self.data.id_column is None:  # as before data.id_column existed: finished shards stay valid
            del parts["data"]["id_column"]
        del parts["explainer"]["additivity_tolerance"]  # a check on the values, not an input to them
        if self.explainer.estimator == "shap":  # as before the adaptive estimator: finished shards stay valid
            del parts["explainer"]["estimator"], parts["explainer"]["tolerance"]
        canonical = json.dumps({**parts, "link": self.link}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def sha256(self) -> str:
        """A stable hash of the resolved config."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def identity_sha256(self) -> str:
        """What makes two runs' explanations comparable (monitor.baseline previous): what determines the values
        (values_sha256) but the model's location and bytes (a retrained model is what drift watches) and the
        rows (selection_sha256 says which rows)."""
        model = self.model.model_copy(
            update=dict.fromkeys(_MODEL_LOCATION & set(type(self.model).model_fields))
        )
        data = self.data.model_copy(
            update={"source": "", "s3": S3Config(), "explain_rows": "all", "seed": 0, "id_column": None}
        )
        return self.model_copy(update={"model": model, "data": data}).values_sha256()

    def selection_sha256(self) -> str:
        """What determines the rows a run explains: data.source (the path or URI), explain_rows, the seed of a
        sample and data.id_column. A scheduled sample compares with the schedule's samples, not a full run."""
        data = self.data
        rows = {
            "source": data.source,
            "explain_rows": data.explain_rows,
            "seed": data.seed if data.explain_rows != "all" else None,
            "id_column": data.id_column,
        }
        canonical = json.dumps(rows, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


# Where a model lives, not what it is: left out of a run's identity.
_MODEL_LOCATION = {"path", "sha256", "endpoint", "budget", "uri", "tracking_uri"}


# Bounds on what a config may be: a real one is a few KB with a few hundred values. Without them a
# 458-byte file of nested aliases expands to gigabytes (the "billion laughs").
MAX_CONFIG_BYTES = 1_000_000
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_DEPTH = 50
# How much of a value a message quotes.
EXCERPT_CHARS = 80


def excerpt(value: Any) -> str:
    """A value as a message quotes it: its repr, cut to EXCERPT_CHARS."""
    text = repr(value)
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 3] + "..."


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(
                    f"key {excerpt(key)} appears twice in one mapping (lines {seen[key]} and {line})"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(ValueError):
    pass


def _expanded_size(node: yaml.Node) -> tuple[int, int]:
    """(values, depth) of the document once every alias is expanded, computed without expanding it."""
    sizes: dict[int, tuple[int, int]] = {}
    # Iterative post-order walk: a recursive one would overflow on deep nesting before we can refuse it.
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    while stack:
        current, children_done = stack.pop()
        if id(current) in sizes:
            continue
        if isinstance(current, yaml.ScalarNode):
            sizes[id(current)] = (1, 1)
            continue
        children = (
            [n for pair in current.value for n in pair]
            if isinstance(current, yaml.MappingNode)
            else list(current.value)
        )
        if not children_done:
            stack.append((current, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
            continue
        total = 1 + sum(sizes[id(child)][0] for child in children)
        depth = 1 + max((sizes[id(child)][1] for child in children), default=0)
        sizes[id(current)] = (min(total, MAX_CONFIG_VALUES + 1), depth)
    return sizes[id(node)]


def read_yaml(text: str, source: str) -> Any:
    """Parse one YAML document of a config, within bounds; a ConfigError names `source` and what is wrong."""
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: {len(text.encode()):,} bytes; a config is at most {MAX_CONFIG_BYTES:,}")
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        values, depth = _expanded_size(node)
        if values > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{source}: expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases repeat "
                "their target); a config needs a few hundred"
            )
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{source}: nested {depth} levels deep; a config needs a few")
        return loader.construct_document(node)
    except _DuplicateKey as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{source}: nested too deeply to read; a config needs a few levels") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({one_line(exc)})") from exc
    finally:
        loader.dispose()


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    value = read_yaml(raw, f"--set {excerpt(item)}: value") if raw.strip() else None
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the raw config with each `key.path=value` override set (value parsed as YAML)."""
    result = copy.deepcopy(raw)
    for item in overrides:
        path, value = _parse_override(item)
        node = result
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(path[: depth + 1])} is not a mapping")
            node = child
        node[path[-1]] = value
    return result


def _resolve_paths(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Make relative local paths absolute against the YAML file's folder."""

    def resolve(section: str, key: str) -> None:
        node = raw.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str):
            value = node[key]
            if "://" not in value and not Path(value).is_absolute():
                node[key] = str((folder / value).resolve())

    resolve("model", "path")
    resolve("data", "source")
    return raw


@dataclass(frozen=True)
class _Place:
    """Where an error is, in the config's words: the keys a person writes, the field they end on, the model
    holding the last key, and whether pydantic's location went on into one member of a union (its type
    names, `constrained-int`, `literal['all']`, are pydantic's, never shown)."""

    keys: tuple[str, ...]
    field: Any
    parent: type[BaseModel] | None
    in_union: bool


def _models_in(annotation: Any) -> type[BaseModel] | tuple[type[BaseModel], ...] | None:
    """The config model a field holds (a section, an optional section), or the models of a tagged union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = tuple(a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel))
    return models[0] if len(models) == 1 else models or None


def _place(loc: tuple[int | str, ...]) -> _Place:
    current: Any = ExplainConfig
    keys: list[str] = []
    field, parent, in_union = None, None, False
    for part in loc:
        if isinstance(current, tuple) and part in _KIND_TAGS:  # model.kind picks the model's section
            current = next(m for m in current if kind_name(m) == part)
        elif isinstance(current, type) and issubclass(current, BaseModel) and isinstance(part, str):
            parent, field = current, current.model_fields.get(part)
            keys.append(part)
            current = _models_in(field.annotation) if field is not None else None
        elif isinstance(part, int):  # a position in a list
            keys.append(str(part))
        else:
            in_union = True
    return _Place(tuple(keys), field, parent, in_union)


def _expected(schema: dict[str, Any]) -> str:
    """A JSON schema in words: `a whole number >= 1 or all`."""
    if "anyOf" in schema:
        return " or ".join(dict.fromkeys(_expected(choice) for choice in schema["anyOf"]))
    if "const" in schema:
        return str(schema["const"])
    if "enum" in schema:
        return " or ".join(str(value) for value in schema["enum"])
    kind = schema.get("type")
    words = {"integer": "a whole number", "number": "a number", "string": "text", "boolean": "true or false"}
    said = words.get(
        str(kind), {"array": "a list", "object": "a mapping", "null": "null"}.get(str(kind), "?")
    )
    for bound, sign in (
        ("minimum", ">="),
        ("exclusiveMinimum", ">"),
        ("maximum", "<="),
        ("exclusiveMaximum", "<"),
    ):
        if bound in schema:
            said += f" {sign} {schema[bound]}"
    return said


def _describe(error: ErrorDetails) -> str:
    place = _place(error["loc"])
    location = ".".join(place.keys)
    message = error["msg"]
    if error["type"] == "value_error":
        # A validator's own sentence: it says what is wrong, and quoting the whole section adds nothing.
        message = message.removeprefix("Value error, ")
    elif error["type"] == "extra_forbidden":
        message = "unknown key"
        known = list(place.parent.model_fields) if place.parent is not None else []
        close = difflib.get_close_matches(place.keys[-1], known, n=1) if place.keys else []
        if close:
            message += f"; did you mean {'.'.join((*place.keys[:-1], close[0]))}?"
    elif error["type"] == "missing":
        message = "required key is missing"
    elif "input" in error and error["type"] not in ("union_tag_invalid", "union_tag_not_found"):
        message = f"{message}, got {excerpt(error['input'])}"
    # A sentence that names its own key (explainer.l1_reg ...) needs no location before it.
    return f"{location}: {message}" if location and not message.startswith(f"{location}.") else message


def _describe_all(errors: list[ErrorDetails]) -> list[str]:
    """One line per key: a value no member of a union takes is one line saying what the key takes (`data.
    explain_rows: expected a whole number >= 1 or all, got 'abc'`), not a line per member."""
    lines: dict[str, str] = {}
    for error in errors:
        place = _place(error["loc"])
        if place.in_union and place.field is not None and "input" in error:
            expected = _expected(TypeAdapter(place.field.annotation).json_schema())
            line = f"{'.'.join(place.keys)}: expected {expected}, got {excerpt(error['input'])}"
        else:
            line = _describe(error)
        lines.setdefault(line, line)
    return list(lines)


_KIND_TAGS = {kind_name(model) for model in MODEL_KINDS}


def parse_config(raw: Any, source: str = "<config>") -> ExplainConfig:
    """Validate a raw mapping into an ExplainConfig; the error names the file and the key."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: expected a mapping of sections (model, data, ...), got {type(raw).__name__}"
        )
    try:
        return ExplainConfig.model_validate(raw)
    except ValidationError as exc:
        details = "; ".join(_describe_all(exc.errors()))
        raise ConfigError(f"{source}: {details}") from exc


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExplainConfig:
    """Read the YAML file, apply --set overrides, resolve relative paths and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config ({type(exc).__name__})") from exc
    raw = read_yaml(text, str(path))
    if raw is None:
        raise ConfigError(f"{path}: the file is empty")
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides or [])
        raw = _resolve_paths(raw, path.resolve().parent)
    return parse_config(raw, str(path))


def config_schema() -> dict[str, Any]:
    """The JSON schema of the YAML config."""
    return ExplainConfig.model_json_schema()
