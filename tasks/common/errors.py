"""Errors a user can act on: each message is one line naming the file, key, column or model."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from shapline.tasks.common.redact import redact


def one_line(text: object, limit: int = 300) -> str:
    """An error's message (or any text) as one line of at most `limit` characters: whitespace runs become
    one space (a library's message spans lines; a one-line error must not), the cut marked with "..."."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


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


class DiskFull(ShaplineError):
    """A folder the run writes to has no space left; the message names it and the setting that moves it."""


# A folder with less free space than this after a failed write is taken for the one that filled up.
_NEARLY_FULL_BYTES = 16 << 20


def _no_space(exc: BaseException) -> OSError | None:
    """The out-of-space OSError behind `exc` (itself or in its causes), else None. Arrow's writers raise one
    without an errno, saying so in the message."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and (
            current.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(current)
        ):
            return current
        current = current.__cause__ or current.__context__
    return None


def out_of_space(exc: BaseException) -> bool:
    """Whether `exc` (or an error behind it) is a write that found no space left."""
    return _no_space(exc) is not None


def disk_full(exc: BaseException, places: dict[str, Path]) -> DiskFull | None:
    """For a write that failed for lack of space: the error naming the full folder among `places` (what it is,
    e.g. "the run's scratch folder (TMPDIR)", and where), by the failed file's path or the space left."""
    error = _no_space(exc)
    if error is None:
        return None
    failed = Path(error.filename) if isinstance(error.filename, str) else None
    named = [what for what, folder in places.items() if failed is not None and folder in failed.parents]
    if not named:
        named = [what for what, folder in places.items() if _free_bytes(folder) < _NEARLY_FULL_BYTES]
    where = named or list(places)
    said = "; ".join(f"{what}: {places[what]} ({_free_bytes(places[what]) >> 20} MB free)" for what in where)
    lead = (
        "no space left on device" if named else "no space left on device in one of the folders the run writes"
    )
    return DiskFull(f"{lead}: {said}; free space there or point the setting at a larger disk")


def _free_bytes(folder: Path) -> int:
    for candidate in (folder, *folder.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return 0
