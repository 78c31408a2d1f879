"""The process's environment variables, read as one snapshot while other threads may change them."""

from __future__ import annotations

import os


def environment() -> dict[str, str]:
    """Every environment variable and its value, as they were a moment ago.

    `dict(os.environ)` lists the names, then reads each value: a variable another thread removes in between
    (MLflow's telemetry thread sets and unsets `_MLFLOW_TELEMETRY_SESSION_ID`) is a KeyError that failed a
    run. A name listed but gone by the time its value is read is left out.
    """
    found = {}
    for name in list(os.environ):
        value = os.environ.get(name)
        if value is not None:
            found[name] = value
    return found
