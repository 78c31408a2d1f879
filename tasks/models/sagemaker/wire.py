"""The endpoint's wire format: rows to request bodies (and where each row ends), response bodies to scores."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import numpy as np
import pandas as pd

from shapline.tasks.common.errors import ModelError

# A megabyte here is 10**6 bytes: below SageMaker's 6 MB limit however that limit is counted.
BYTES_PER_MB = 1_000_000
# How much of an unexpected response a message quotes.
QUOTE_CHARS = 200


def quote(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    flat = " ".join(text.split())
    return repr(flat[:QUOTE_CHARS] + ("..." if len(flat) > QUOTE_CHARS else ""))


def _python_rows(frame: pd.DataFrame) -> list[list[Any]]:
    """Rows as lists of plain Python values, None where a value is missing."""
    values = frame.astype(object).where(frame.notna(), None)
    return [[v.item() if isinstance(v, np.generic) else v for v in row] for row in values.to_numpy().tolist()]


def _csv_lines(frame: pd.DataFrame) -> list[str]:
    # pandas writes floats at full (round-trip) precision and NaN as an empty field.
    text = frame.to_csv(header=False, index=False, lineterminator="\n")
    lines = text.split("\n")[:-1]
    if len(lines) == len(frame):
        return [line + "\n" for line in lines]
    # A quoted field holds a newline: render row by row so each row stays one unit.
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    rendered = []
    for row in _python_rows(frame):
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(["" if v is None else v for v in row])
        rendered.append(buffer.getvalue())
    return rendered


def _all_numbers(frame: pd.DataFrame) -> bool:
    return all(
        (pd.api.types.is_float_dtype(dtype) or pd.api.types.is_integer_dtype(dtype))
        and not pd.api.types.is_bool_dtype(dtype)
        for dtype in frame.dtypes
    )


def _arrow_csv(frame: pd.DataFrame) -> tuple[bytes, np.ndarray]:
    """Numbers-only rows through Arrow's CSV writer: faster than DataFrame.to_csv, same values.

    Arrow writes the shortest text that reads back as the same float (1040 where pandas writes
    1040.0) and a missing value (NaN) as an empty field, as pandas does.
    """
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    if all(isinstance(dtype, np.dtype) for dtype in frame.dtypes):
        # Plain numpy columns: from_pandas' per-call bookkeeping dwarfs a small batch's conversion.
        columns = [pa.array(frame.iloc[:, j].to_numpy(), from_pandas=True) for j in range(frame.shape[1])]
        table = pa.Table.from_arrays(columns, names=[str(c) for c in frame.columns])
    else:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    sink = pa.BufferOutputStream()
    pa_csv.write_csv(table, sink, pa_csv.WriteOptions(include_header=False, quoting_style="none"))
    data = sink.getvalue().to_pybytes()
    ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n")) + 1
    return data, ends


def serialize_rows(frame: pd.DataFrame, content_type: str) -> tuple[bytes, np.ndarray]:
    """All rows as one request body in `content_type`, and the byte offset where each row ends."""
    if content_type == "text/csv" and len(frame.columns) and _all_numbers(frame):
        data, ends = _arrow_csv(frame)
        if len(ends) == len(frame):
            return data, ends
    if content_type == "text/csv":
        lines = _csv_lines(frame)
    else:
        lines = [json.dumps(row, separators=(",", ":")) + "\n" for row in _python_rows(frame)]
    text = "".join(lines)
    if text.isascii():
        sizes = np.fromiter((len(line) for line in lines), dtype=np.int64, count=len(lines))
    else:
        sizes = np.fromiter((len(line.encode()) for line in lines), dtype=np.int64, count=len(lines))
    return text.encode(), np.cumsum(sizes)


def plan_requests(ends: np.ndarray, max_bytes: int, max_rows: int | None) -> list[tuple[int, int]]:
    """Split rows (given each row's end offset) into [start, stop) ranges under both caps."""
    spans = []
    start, n = 0, len(ends)
    while start < n:
        before = int(ends[start - 1]) if start else 0
        stop = int(np.searchsorted(ends, before + max_bytes, side="right"))
        if max_rows is not None:
            stop = min(stop, start + max_rows)
        if stop == start:
            raise ValueError(f"row {start} alone is {int(ends[start]) - before} bytes, over {max_bytes}")
        spans.append((start, stop))
        start = stop
    return spans


def _score(item: Any, key: int | str) -> Any:
    if isinstance(item, dict):
        return item[key]
    if isinstance(item, list):
        return item[0] if len(item) == 1 else item[int(key)]
    return item


def _csv_column(body: bytes, column: int, rows: int) -> np.ndarray | None:
    """Column `column` of a plain CSV body with `rows` lines of equal width, parsed without a Python object
    per line (a list per line of a million-line answer keeps the garbage collector busy for seconds);
    None when the body is anything else, so the careful path can say what is wrong with it."""
    if rows == 0 or column < 0 or b'"' in body or b"\r" in body:
        return None
    raw = np.frombuffer(body.rstrip(b"\n"), dtype=np.uint8)
    newlines = np.flatnonzero(raw == ord("\n"))
    if len(newlines) != rows - 1:
        return None
    starts = np.concatenate(([0], newlines + 1))
    per_line = np.add.reduceat((raw == ord(",")).view(np.uint8), starts, dtype=np.int64)
    width = int(per_line[0]) + 1
    if np.any(per_line != width - 1):
        return None
    if column >= width and width > 1:
        return None
    import pyarrow as pa

    tokens = body.decode("ascii", "replace").replace(",", "\n").split("\n")[: rows * width]
    try:
        return pa.array(tokens[column if width > 1 else 0 :: width]).cast(pa.float64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def parse_scores(body: bytes, accept: str, score_column: int | str, rows: int, endpoint: str) -> np.ndarray:
    """One float score per row from a response body; a ModelError quoting the body when it does not fit."""
    if accept == "text/csv" and isinstance(score_column, int):
        scores = _csv_column(body, score_column, rows)
        if scores is not None and len(scores) == rows:
            return scores
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelError(f"endpoint {endpoint}: response is not UTF-8 text: {quote(body)}") from exc
    if accept == "application/json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"endpoint {endpoint}: response is not JSON: {quote(text)}") from exc
        items = document.get("predictions") if isinstance(document, dict) else document
        if not isinstance(items, list):
            raise ModelError(
                f"endpoint {endpoint}: JSON response is neither a list nor has 'predictions': {quote(text)}"
            )
    else:
        lines = text.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        if accept == "text/csv":
            items = list(csv.reader(lines)) if '"' in text else [line.split(",") for line in lines]
        else:
            try:
                items = [json.loads(line) for line in lines]
            except json.JSONDecodeError as exc:
                raise ModelError(f"endpoint {endpoint}: response is not JSON lines: {quote(text)}") from exc
    if len(items) != rows:
        raise ModelError(
            f"endpoint {endpoint}: response has {len(items)} lines for {rows} rows sent: {quote(text)}"
        )
    scores = np.empty(rows)
    for position, item in enumerate(items):
        try:
            value = _score(item, score_column)
            if isinstance(value, bool):
                raise ValueError
            scores[position] = float(value)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ModelError(
                f"endpoint {endpoint}: no numeric score (endpoint.score_column {score_column!r}) "
                f"in response line {position + 1}: {quote(json.dumps(item) if accept != 'text/csv' else ','.join(item))}"
            ) from exc
    return scores
