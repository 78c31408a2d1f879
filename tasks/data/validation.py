"""Validate the data with Great Expectations before any SHAP compute is spent."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from shapline.tasks.common.config import ValidationConfig
from shapline.tasks.common.errors import ConfigError, one_line
from shapline.tasks.common.redact import redact

AUTOMATIC = "automatic"
# An automatic expectation's meta names the config key it checks (its failure line starts with it).
ROLE = "shapline_checks"


@dataclass(frozen=True)
class ValidationReport:
    """The GX result as JSON plus one readable line per failed expectation."""

    success: bool
    failures: list[str]
    blocking: list[str]
    result: dict[str, Any] = field(repr=False)
    evaluated: int = 0
    # Of the evaluated: shapline's own (every feature present, rows, the id column), not the config's.
    automatic: int = 0

    def counted(self) -> str:
        """`14 expectations: 3 from the config, 11 shapline's own (every feature present, rows, the id column)`."""
        plural = "s" if self.evaluated != 1 else ""
        return (
            f"{self.evaluated} expectation{plural}: {self.evaluated - self.automatic} from the config, "
            f"{self.automatic} shapline's own (every feature present, the data has rows, the id column)"
        )

    def to_json(self) -> str:
        """validation.json: the GX suite result with shapline's summary on top."""
        summary = {
            "success": self.success,
            "evaluated_expectations": self.evaluated,
            "automatic_expectations": self.automatic,
            "failures": self.failures,
            "gx_result": self.result,
        }
        return redact(json.dumps(summary, indent=2, default=str))


def _expectation_class(name: str, position: int) -> type:
    import great_expectations as gx

    class_name = "".join(part.capitalize() for part in name.split("_"))
    expectation = getattr(gx.expectations, class_name, None)
    if expectation is None:
        raise ConfigError(
            f"validation.expectations[{position}]: unknown Great Expectations expectation {name!r}"
        )
    return expectation


def build_expectations(
    features: list[str], config: ValidationConfig, id_column: str | None = None
) -> list[Any]:
    """The automatic expectations (features present, rows non-empty, the id column present, non-null and
    unique), then the YAML ones."""
    import great_expectations as gx

    automatic = {"shapline": AUTOMATIC}
    suite: list[Any] = [gx.expectations.ExpectTableRowCountToBeBetween(min_value=1, meta=automatic)]
    suite += [gx.expectations.ExpectColumnToExist(column=f, meta=automatic) for f in features]
    if id_column is not None:
        identity = {**automatic, ROLE: "data.id_column"}
        suite += [
            gx.expectations.ExpectColumnToExist(column=id_column, meta=identity),
            gx.expectations.ExpectColumnValuesToNotBeNull(column=id_column, meta=identity),
            gx.expectations.ExpectColumnValuesToBeUnique(column=id_column, meta=identity),
        ]
    for position, item in enumerate(config.expectations):
        name, kwargs = next(iter(item.items()))
        expectation = _expectation_class(name, position)
        try:
            suite.append(expectation(**(kwargs or {})))
        except Exception as exc:  # GX raises its own (pydantic v1) ValidationError for bad kwargs
            details = getattr(exc, "errors", None)
            errors = details() if callable(details) else []
            reason = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors) or str(exc)
            raise ConfigError(f"validation.expectations[{position}] {name}: {reason}") from exc
    return suite


_COLUMN_ARGUMENTS = ("column", "column_A", "column_B")
_COLUMN_LIST_ARGUMENTS = ("column_list", "column_set")


def _columns_named(kwargs: dict[str, Any]) -> list[str]:
    """The columns an expectation's arguments name."""
    named = [str(kwargs[key]) for key in _COLUMN_ARGUMENTS if key in kwargs]
    for key in _COLUMN_LIST_ARGUMENTS:
        named += [str(column) for column in kwargs.get(key) or []]
    return named


def shapline_checks(
    frame: pd.DataFrame, config: ValidationConfig, repeated_columns: tuple[str, ...] = ()
) -> list[str]:
    """What must hold before any expectation means anything: unique column names (pandas would rename a
    repeated CSV column and the run would explain the wrong one) and every column an expectation names."""
    failures = [
        f"column {name!r} appears more than once in the data; column names must be unique"
        for name in repeated_columns
    ]
    present = {str(c) for c in frame.columns}
    for position, item in enumerate(config.expectations):
        name, kwargs = next(iter(item.items()))
        for column in _columns_named(kwargs or {}):
            if column not in present:
                failures.append(
                    f"validation.expectations[{position}] {name}: column {column!r} is not in the data"
                )
    return failures


def _exception_message(result: Any) -> str | None:
    """The message of an exception GX caught while evaluating, wherever GX 1.x keeps it."""
    info = result.exception_info or {}
    if info.get("exception_message"):
        return str(info["exception_message"])
    # GX 1.x keys exception_info by metric id when a metric failed.
    for value in info.values():
        if isinstance(value, dict) and value.get("exception_message"):
            return str(value["exception_message"])
    return None


def _describe_failure(result: Any) -> str:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
    arguments = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    details = result.result or {}
    if config.type == "expect_column_to_exist":
        return f"column {kwargs.get('column')!r} is missing (expect_column_to_exist)"
    if config.type == "expect_table_row_count_to_be_between":
        return f"the data has {details.get('observed_value', 0)} rows ({config.type}({arguments}))"
    exception = _exception_message(result)
    if exception:
        return f"{config.type}({arguments}): could not be evaluated: {one_line(exception, 200)}"
    if "unexpected_count" in details:
        return f"{config.type}({arguments}): {details['unexpected_count']} unexpected values"
    if "observed_value" in details:
        return f"{config.type}({arguments}): observed {details['observed_value']!r}"
    return f"{config.type}({arguments}): failed"


def validate_frame(
    frame: pd.DataFrame,
    features: list[str],
    config: ValidationConfig,
    repeated_columns: tuple[str, ...] = (),
    id_column: str | None = None,
) -> ValidationReport:
    """Run the expectations on the whole table; `blocking` lists failures that stop the run.

    shapline's own checks (unique column names, the columns expectations name) always block: on data
    that is not what the config says, no expectation result means anything.
    """
    checks = shapline_checks(frame, config, repeated_columns)
    if checks:
        return ValidationReport(
            success=False,
            failures=checks,
            blocking=checks,
            result={"shapline_checks": checks, "expectations_evaluated": False},
            evaluated=0,
        )
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    for name in ("great_expectations", "great_expectations.data_context.types.base"):
        logging.getLogger(name).setLevel(logging.WARNING)

    expectations = build_expectations(features, config, id_column)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("shapline")
    batch = (
        source.add_dataframe_asset("rows")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": frame.reset_index(drop=True)})
    )
    suite = gx.ExpectationSuite(name="shapline", expectations=expectations)
    try:
        result = batch.validate(suite)
    finally:
        # GX keeps its last context (and the context its data sources' batches) for the process's
        # lifetime: without this the whole table outlives validation, through every later phase.
        context.data_sources.delete("shapline")
        del batch
    failures, blocking = [], []
    automatic = sum(
        (item.expectation_config.meta or {}).get("shapline") == AUTOMATIC
        for item in result.results
        if item.expectation_config is not None
    )
    for item in result.results:
        if item.success:
            continue
        line = _describe_failure(item)
        meta = item.expectation_config.meta if item.expectation_config is not None else None
        if (meta or {}).get(ROLE):
            line = f"{(meta or {})[ROLE]}: {line}"
        failures.append(line)
        automatic = (meta or {}).get("shapline") == AUTOMATIC
        if automatic or config.on_failure == "fail":
            blocking.append(line)
    return ValidationReport(
        success=bool(result.success),
        failures=failures,
        blocking=blocking,
        result=result.to_json_dict(),
        evaluated=len(result.results),
        automatic=automatic,
    )
