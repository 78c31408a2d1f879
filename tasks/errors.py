"""Errors a user can act on: each message is one line naming the file, key, column or model."""

from __future__ import annotations

from shapline.tasks.redact import redact


class ShaplineError(Exception):
    """A problem in the user's config, data or model; the CLI prints its message as one line.

    The message is redacted when the error is made, so no copy of it (a Prefect state message, a log
    line, an MLflow tag, the CLI's line) can carry a credential the user typed.
    """

    exit_code = 1
    transient = False

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(redact(str(message)), *args)


class UnexpectedError(ShaplineError):
    """A failure shapline did not foresee, re-raised with its message redacted; the original is its cause."""

    def __init__(self, message: object, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ConfigError(ShaplineError):
    """The YAML config is malformed, has an unknown key or a value of the wrong type."""

    exit_code = 2


class DataError(ShaplineError):
    """The data file is missing, unreadable or lacks the columns the model needs."""


class ModelError(ShaplineError):
    """The model file is missing or cannot be used as the config says."""


class TransientModelError(ModelError):
    """A fault that may pass (an endpoint refusing connections, timing out, throttling, answering 5xx).

    Raised once the predictor's own quick retries are spent; the shard task retries it later, with backoff.
    """

    transient = True


class ValidationFailed(ShaplineError):
    """Great Expectations found the data unfit and validation.on_failure is `fail`."""


class ExplainError(ShaplineError):
    """The explainer cannot run on this model and data as configured."""


class BudgetExceeded(ShaplineError):
    """The estimated endpoint inference is above model.budget.max_inference_rows."""


class PrefectUnavailable(ShaplineError):
    """No Prefect API to run the flow against: the temporary server did not start, or the server is down."""


class TrackingError(ShaplineError):
    """The MLflow store cannot be written (down, read-only, refusing)."""


class AttributionDrift(ShaplineError):
    """The run's explanation moved past monitor.ndcg_threshold and monitor.on_drift is `fail`.

    Raised after the MLflow run ended FINISHED with every artifact (the explanation is valid; it is the
    model that moved): it fails the Prefect flow run and gives `shapline run` exit code 3. `summary` is
    the run's --json object.
    """

    exit_code = 3

    def __init__(self, message: object, summary: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.summary = summary or {}
