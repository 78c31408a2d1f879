"""The model called before any SHAP compute, on the rows it is most likely to refuse: a refusal names the row.

The probe's rows are the first two rows and, for each column, the first row (of the rows to explain and the
background) with a missing value and the first with text among numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from shapline.tasks.common.errors import ModelError, one_line
from shapline.tasks.models.predictors import Predictor, checked_output


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _text_among_numbers(column: pd.Series) -> pd.Series:
    """Cells of a text column that do not read as numbers, when most of its cells do (a typo in a number
    column: 'abc' among '12.5', '13.1'); an empty selection for a real text column."""
    if pd.api.types.is_numeric_dtype(column) or column.isna().all():
        return column.iloc[:0]
    present = column.dropna()
    numeric = present.map(_is_number)
    if numeric.mean() < 0.5:
        return column.iloc[:0]
    return present[~numeric]


def probe_rows(frame: pd.DataFrame, *others: pd.DataFrame) -> pd.DataFrame:
    """A few rows that try the model on what the explainer will give it: the first two rows, and for each
    column the first row (of `frame` or `others`, e.g. the background) with a missing value in it and the
    first with text among numbers."""
    picked: list[pd.DataFrame] = [frame.iloc[:2]]
    for table in (frame, *others):
        for column in table.columns:
            missing = table.index[table[column].isna().to_numpy()]
            odd = _text_among_numbers(table[column]).index
            picked += [table.loc[[index]] for index in (missing[:1].tolist() + odd[:1].tolist())]
    probe = pd.concat(picked)
    # A copy: a slice of a column is a view of the whole column, which the plan would keep alive.
    return probe[~probe.index.duplicated()].copy()


def _what_is_odd(row: pd.Series) -> str:
    """The cells of one row a model is likely to refuse: missing values, text among numbers."""
    missing = [str(c) for c, v in row.items() if pd.isna(v)]
    text = [f"{c}={v!r}" for c, v in row.items() if isinstance(v, str) and not _is_number(v)]
    parts = []
    if missing:
        parts.append(
            f"missing values in {', '.join(missing)} (refuse such data with expect_column_values_to_not_be_null, "
            "or impute in the model)"
        )
    if text:
        parts.append(f"text in {', '.join(text)}")
    return "; ".join(parts)


def probe_output(
    predictor: Predictor, rows: pd.DataFrame, class_index: int | None, probabilities: bool = False
) -> np.ndarray:
    """The model's output on the probe rows, called before any SHAP compute.

    A failure names the first row the model refuses (its row_id) and what is odd about it, rather than
    leaving a shard to fail later with the model's own message. Its outputs are checked as every later
    call's are (`checked_output`): finite, one row each, probabilities where the logit link needs them.
    """
    try:
        output = predictor.predict(rows)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(_refusal(predictor, rows, exc)) from exc
    checked_output(predictor, output, rows, probabilities=probabilities, where="the probe", row_ids=True)
    if class_index is not None and output.shape[1] > 1 and class_index >= output.shape[1]:
        raise ModelError(
            f"model.class_index: {class_index} is out of range; the model has {output.shape[1]} outputs"
        )
    return output


def _arrow_text(frame: pd.DataFrame) -> dict[Any, pd.StringDtype]:
    """The text columns pandas keeps in pyarrow (its default `str` when pyarrow is installed), by dtype."""
    return {c: t for c, t in frame.dtypes.items() if isinstance(t, pd.StringDtype) and t.storage == "pyarrow"}


def arrow_text_columns(frame: pd.DataFrame) -> list[str]:
    """The names of the text columns pandas keeps in pyarrow."""
    return [str(c) for c in _arrow_text(frame)]


def with_python_text(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with its pyarrow text columns held as Python strings: the same dtype name, values and
    missing value, another storage."""
    converted = {c: pd.StringDtype("python", na_value=t.na_value) for c, t in _arrow_text(frame).items()}
    return frame.astype(converted) if converted else frame


def same_with_python_text(predictor: Predictor, rows: pd.DataFrame, output: np.ndarray) -> bool:
    """Whether the model gives the probe rows' outputs bit for bit with their text held as Python strings.

    A scikit-learn Pipeline turns text into Python objects on every call, ~0.2 ms a thousand rows and two
    columns when pandas keeps them in pyarrow: for a kernel call of 25,000 rows, a quarter of the call.
    Only a model that gives the same outputs either way is given them (one that looks at the storage, or
    fails, is not); the values are then the same as well.
    """
    if not _arrow_text(rows):
        return False
    try:
        again = predictor.predict(with_python_text(rows))
    except Exception:  # noqa: BLE001 - the model takes only its own storage: it keeps it
        return False
    return again.shape == output.shape and bool(np.array_equal(again, output, equal_nan=True))


def _refusal(predictor: Predictor, rows: pd.DataFrame, exc: Exception) -> str:
    message = one_line(exc, 300)
    where = "the data"
    for position in range(len(rows)):
        try:
            predictor.predict(rows.iloc[position : position + 1])
        except Exception:
            odd = _what_is_odd(rows.iloc[position])
            # A model that refuses ordinary rows refuses the data as a whole; name a row only when it is special.
            if odd or position >= 2:
                where = f"row_id {rows.index[position]}" + (f" ({odd})" if odd else "")
            break
    return f"model {predictor.name}: {predictor.method}() failed on {where}: {message}"
