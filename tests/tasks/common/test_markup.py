"""Names from the data escaped for where they land: HTML, JSON in a script, markdown."""

from __future__ import annotations

import datetime
import json

import numpy as np
import pandas as pd
import pytest

from shapline.tasks.common.markup import html_text, markdown_code, markdown_text, script_json
from shapline.tasks.results.summary import RunSummary

HOSTILE = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(2)>',
    "a|b",
    "*bold* _it_ [x](y)",
    "`tick`",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_markdown_text_has_no_markup_left(name: str) -> None:
    text = markdown_text(name)
    assert "<" not in text and ">" not in text
    for char in "|*_[]`":
        assert text.count(char) == text.count("\\" + char), (char, text)


def test_a_code_span_holds_backticks_exactly() -> None:
    assert markdown_code("a`b") == "``a`b``"
    assert markdown_code("`x") == "`` `x ``"
    assert markdown_code("/models/m.joblib") == "`/models/m.joblib`"


def test_html_and_script_json() -> None:
    assert html_text('"><img src=x>') == "&quot;&gt;&lt;img src=x&gt;"
    assert json.loads(script_json(HOSTILE)) == HOSTILE and "<" not in script_json(HOSTILE)


def test_script_json_writes_data_values_as_a_person_reads_them() -> None:
    """A force plot's feature values come from the frame: a nullable column's NA and a missing time are null,
    times and durations ISO text, numpy scalars numbers; anything else JSON has no value for is refused."""
    values = [
        pd.NA,
        pd.NaT,
        np.datetime64("NaT"),
        pd.Timestamp("2026-01-02 03:04", tz="UTC"),
        np.datetime64("2026-01-02"),
        datetime.date(2026, 1, 2),
        pd.Timedelta("1D2h"),
        datetime.timedelta(hours=3),
        np.int64(3),
        np.float32(0.5),
        np.bool_(True),
        "</script>",
    ]
    assert json.loads(script_json(values)) == [
        None,
        None,
        None,
        "2026-01-02T03:04:00+00:00",
        "2026-01-02T00:00:00",
        "2026-01-02",
        "P1DT2H0M0S",
        "P0DT3H0M0S",
        3,
        0.5,
        True,
        "</script>",
    ]
    assert "<" not in script_json(values)
    with pytest.raises(TypeError, match="object"):
        script_json([object()])


def test_the_prefect_artifact_says_names_as_text() -> None:
    importance = pd.DataFrame(
        {"feature": HOSTILE, "mean_abs": [0.5, 0.4, 0.3, 0.2, 0.1], "rank": [1, 2, 3, 4, 5]}
    )
    summary = RunSummary(
        mlflow_run_id="r",
        experiment_id="1",
        experiment="e",
        tracking_uri="sqlite:///m.db",
        run_url="sqlite:///m.db (experiment 1, run r)",
        model="<b>m</b>",
        rows_explained=1,
        shards=1,
        shards_reused=0,
        shards_computed=1,
        background_rows=1,
        additivity_max_error=0.0,
        duration_s=1.0,
        explain_s=1.0,
        algorithm="kernel",
        link="logit",
        validation_success=True,
        importance=importance,
    )
    markdown = summary.markdown()
    assert "<script" not in markdown and "<img" not in markdown and "<b>" not in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "rank" not in line]
    assert len(rows) == 5 and all(line.count(" | ") == 2 for line in rows)  # no cell split by a name's |
