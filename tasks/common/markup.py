"""Text from the data or the config (a column name, a class label, a path) escaped for where it lands.

A name is data, never markup: in HTML text and attributes, in JSON inside a <script>, and in the markdown
MLflow and Prefect render (a run's description, the summary artifact), it shows as the characters it is.
"""

from __future__ import annotations

import datetime
import html
import json
import re
from typing import Any

from shapline.tasks.common.redact import redact

# Characters markdown (CommonMark, GitHub's tables) reads as syntax inside a line: each is escaped with a
# backslash (`#`, `-`, `+` and `1.` are syntax only where a line starts, which these texts never do).
_MARKDOWN_SYNTAX = re.compile(r"([\\`*_\[\]|~])")


def html_text(value: object) -> str:
    """Text for HTML, text or a quoted attribute: redacted, then escaped."""
    return html.escape(redact(str(value)), quote=True)


def markdown_text(value: object) -> str:
    """Text for markdown that renders as the characters it is: no emphasis, link, table cell or raw HTML."""
    text = html.escape(redact(str(value)), quote=False)
    return _MARKDOWN_SYNTAX.sub(r"\\\1", " ".join(text.split()))


def markdown_code(value: object) -> str:
    """A code span holding the text exactly: fenced by more backticks than any run inside it."""
    text = " ".join(redact(str(value)).split())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    padded = f" {text} " if text.startswith("`") or text.endswith("`") else text
    return f"{fence}{padded}{fence}"


def script_json(value: Any) -> str:
    """JSON that stays one value inside an HTML <script> element: `<`, `>` and `&` (so no `</script>` or
    `<!--` in a name can end the script and start markup) and the two line separators JavaScript once
    refused in strings are written as \\u escapes, which JSON reads back as the same characters. A data
    value JSON has no type for (a force plot's feature values come from the frame) is written as a person
    reads it: pandas' missing values (NA, NaT) as null, times and durations as ISO text, numpy scalars as
    numbers; anything else is refused."""
    text = json.dumps(value, default=_data_value)
    for char in ("<", ">", "&", "\u2028", "\u2029"):
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def _data_value(value: Any) -> Any:
    import numpy as np
    import pandas as pd

    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (np.datetime64, np.timedelta64)):
        value = pd.Timestamp(value) if isinstance(value, np.datetime64) else pd.Timedelta(value)
        return None if value is pd.NaT else value.isoformat()
    if isinstance(value, datetime.timedelta):
        return pd.Timedelta(value).isoformat()
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
