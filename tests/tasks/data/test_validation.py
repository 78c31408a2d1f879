from __future__ import annotations

import json

import pandas as pd
import pytest

from shapline.tasks.common.config import ValidationConfig
from shapline.tasks.common.errors import ConfigError
from shapline.tasks.data.validation import validate_frame


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame({"Day Mins": [10.0, None, 500.0], "State": ["KS", "OH", "NJ"]})


def expectations(*items: dict) -> list[dict]:
    return list(items)


def test_passing_suite_reports_success(frame: pd.DataFrame) -> None:
    config = ValidationConfig(
        expectations=expectations(
            {"expect_column_values_to_be_in_set": {"column": "State", "value_set": ["KS", "OH", "NJ"]}}
        )
    )
    report = validate_frame(frame, ["Day Mins", "State"], config)
    assert report.success and report.failures == [] and report.evaluated == 4
    assert json.loads(report.to_json())["gx_result"]["success"] is True


def test_failures_name_expectation_and_column(frame: pd.DataFrame) -> None:
    config = ValidationConfig(
        expectations=expectations(
            {"expect_column_values_to_not_be_null": {"column": "Day Mins"}},
            {"expect_column_values_to_be_between": {"column": "Day Mins", "min_value": 0, "max_value": 400}},
        )
    )
    report = validate_frame(frame, ["Day Mins"], config)
    assert not report.success
    assert report.blocking == report.failures
    assert "expect_column_values_to_not_be_null(column='Day Mins'): 1 unexpected values" in report.failures
    assert any("expect_column_values_to_be_between" in f and "'Day Mins'" in f for f in report.failures)


def test_warn_does_not_block_but_missing_features_always_do(frame: pd.DataFrame) -> None:
    config = ValidationConfig(
        on_failure="warn",
        expectations=expectations({"expect_column_values_to_not_be_null": {"column": "Day Mins"}}),
    )
    report = validate_frame(frame, ["Day Mins", "Eve Mins"], config)
    assert len(report.failures) == 2
    assert report.blocking == ["column 'Eve Mins' is missing (expect_column_to_exist)"]


def test_empty_table_is_blocking() -> None:
    report = validate_frame(pd.DataFrame({"a": pd.Series([], dtype=float)}), ["a"], ValidationConfig())
    assert report.blocking == ["the data has 0 rows (expect_table_row_count_to_be_between(min_value=1))"]


def test_unknown_expectation_is_a_config_error(frame: pd.DataFrame) -> None:
    config = ValidationConfig(expectations=expectations({"expect_column_to_be_awesome": {"column": "State"}}))
    with pytest.raises(
        ConfigError, match=r"validation\.expectations\[0\]: unknown .* 'expect_column_to_be_awesome'"
    ):
        validate_frame(frame, ["State"], config)


def test_bad_expectation_arguments_are_a_config_error(frame: pd.DataFrame) -> None:
    config = ValidationConfig(
        expectations=expectations({"expect_column_values_to_not_be_null": {"colum": "State"}})
    )
    with pytest.raises(
        ConfigError, match=r"validation\.expectations\[0\] expect_column_values_to_not_be_null: .*colum"
    ):
        validate_frame(frame, ["State"], config)
