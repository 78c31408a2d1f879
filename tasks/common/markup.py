"""Text from the data or the config (a column name, a class label, a path) escaped for where it lands.

A name is data, never markup: in HTML text and attributes, in JSON inside a <script>, and in the markdown
MLflow and Prefect render (a run's description, the summary artifact), it shows as the characters it is.
"""

from __future__ import annotations

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
    refused in strings are written as \\u escapes, which JSON reads back as the same characters. pandas'
    missing scalars (NA, NaT: a nullable column's missing value) are null."""
    text = json.dumps(value, default=_missing_as_null)
    for char in ("<", ">", "&", "\u2028", "\u2029"):
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def _missing_as_null(value: Any) -> None:
    import pandas as pd

    if value is pd.NA or value is pd.NaT:
        return None
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
