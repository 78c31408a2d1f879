"""Errors a user can act on: each message is one line naming the file, key, column or model."""

from __future__ import annotations


class ShaplineError(Exception):
    """A problem in the user's config, data or model; the CLI prints its message as one line."""

    exit_code = 1


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
