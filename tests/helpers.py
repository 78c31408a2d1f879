"""Helpers the end-to-end tests share: run the CLI in-process, read what a run logged."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from shapline.flows.cli import main
from shapline.tasks.common.environment import environment


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any], str]:
    """Exit code, the JSON object on stdout's last line, and stderr of `shapline ARGS`."""
    code = main(args)
    out, err = capsys.readouterr()
    last = out.strip().splitlines()[-1] if out.strip() else "{}"
    return code, json.loads(last), err


def all_runs(uri: str) -> list[Any]:
    """Every MLflow run in the store, in every experiment."""
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []


def artifact(uri: str, run_id: str, name: str, folder: Path) -> Path:
    """Download one artifact of a run into `folder`."""
    return Path(MlflowClient(uri).download_artifacts(run_id, name, str(folder)))


def logged_values(uri: str, run_id: str, folder: Path) -> pd.DataFrame:
    """The run's shap_values.parquet."""
    return pd.read_parquet(artifact(uri, run_id, "shap_values.parquet", folder))


def assert_same_values(
    uri: str, first: dict[str, Any], second: dict[str, Any], folder: Path, atol: float = 1e-12
) -> None:
    """Two runs (their --json summaries) logged the same SHAP values table, to `atol` (0: bit for bit)."""
    left = logged_values(uri, first["mlflow_run_id"], folder / "first")
    right = logged_values(uri, second["mlflow_run_id"], folder / "second")
    if atol == 0:
        pd.testing.assert_frame_equal(left, right)
    else:
        pd.testing.assert_frame_equal(left, right, check_exact=False, rtol=min(atol, 1e-12), atol=atol)


def free_port() -> int:
    """A TCP port on loopback nobody listens on (yet)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Wrapped:
    """A classifier around a fitted one (its classes, its fit), which subclasses watch or bend."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.classes_ = model.classes_

    def fit(self, rows: Any, target: Any) -> Self:
        self.model.fit(rows, target)
        return self


class Watched(Wrapped):
    """A classifier that says where it is through marker files `<event>-<pid>` in `folder`, and pauses at the
    events in `pause_on` so a test can kill the process there: `loading` (a pool worker unpickling it, i.e.
    warming up), `probing` (the flow process's first call), `predicting` (a pool worker's first call)."""

    PAUSE_S = 4.0

    def __init__(self, model: Any, folder: str, pause_on: set[str]) -> None:
        super().__init__(model)
        self.folder = folder
        self.pause_on = set(pause_on)

    def _mark(self, event: str) -> None:
        import os
        import time

        Path(self.folder, f"{event}-{os.getpid()}").touch()
        if event in self.pause_on:
            time.sleep(self.PAUSE_S)

    @staticmethod
    def _in_worker() -> bool:
        import multiprocessing

        return multiprocessing.parent_process() is not None

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._called = False
        if self._in_worker():
            self._mark("loading")
            self._mark("loaded")

    def predict_proba(self, rows: Any) -> Any:
        if not getattr(self, "_called", False):
            self._called = True
            self._mark("predicting" if self._in_worker() else "probing")
        return self.model.predict_proba(rows)


class TaskRunWitness(Wrapped):
    """A classifier that records, at every call on a shard thread of this process, whether the call runs
    inside a Prefect task run's context (a shard its task started) or not (a shard the runner started
    ahead of its task, in the flow's context)."""

    seen: list[bool] = []  # class-level: the flow's copy of the model (loaded from its file) records here

    def predict_proba(self, rows: Any) -> Any:
        import threading

        from prefect.context import TaskRunContext

        if threading.current_thread().name.startswith("shapline-shard"):
            TaskRunWitness.seen.append(TaskRunContext.get() is not None)
        return self.model.predict_proba(rows)


class StorageMinded(Wrapped):
    """A classifier whose outputs move (by 1e-9) when a text column reaches it as Python strings rather than
    pyarrow's: a model that tells the storages apart (and not a scikit-learn one), which keeps the data's
    own."""

    def predict_proba(self, rows: Any) -> Any:
        python = any(isinstance(t, pd.StringDtype) and t.storage == "python" for t in rows.dtypes.to_numpy())
        return self.model.predict_proba(rows) * (1.0 - 1e-9 if python else 1.0)


class Hangs(Wrapped):
    """A classifier whose predict_proba never returns (sleeps HANG_S) when a shard calls it (on a thread other
    than the main one, where the flow's probe calls it, or in a pool worker), once `after_shards` finished
    shard files are in `store` (a shard store's root); first it touches `hanging-<pid>-<thread>-<random>`
    in `folder`."""

    HANG_S = 600.0

    def __init__(self, model: Any, folder: str, store: str, after_shards: int = 0) -> None:
        super().__init__(model)
        self.folder = folder
        self.store = store
        self.after_shards = after_shards

    def predict_proba(self, rows: Any) -> Any:
        import multiprocessing
        import os
        import threading
        import time
        import uuid

        current = threading.current_thread()
        in_shard = multiprocessing.parent_process() is not None or current is not threading.main_thread()
        if in_shard and len(list(Path(self.store).rglob("shard-*.parquet"))) >= self.after_shards:
            Path(self.folder, f"hanging-{os.getpid()}-{current.name}-{uuid.uuid4().hex[:8]}").touch()
            time.sleep(self.HANG_S)
        return self.model.predict_proba(rows)


class FreezeWitness(Wrapped):
    """A classifier that records, at every call in this process, how many objects gc.freeze() set aside."""

    seen: list[int] = []  # class-level: the flow's copy of the model (loaded from its file) records here

    def predict_proba(self, rows: Any) -> Any:
        import gc

        FreezeWitness.seen.append(gc.get_freeze_count())
        return self.model.predict_proba(rows)


def own_server_env(tmp_path: Path, *unset: str) -> dict[str, str]:
    """This process's environment for a child `shapline` that starts a temporary Prefect server of its own: no
    PREFECT_API_URL (nor the variables in `unset`), its Prefect home (and so the server's database) in
    tmp_path/prefect-home."""
    env = {
        name: value
        for name, value in environment().items()
        if name != "PREFECT_API_URL" and name not in unset
    }
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    return env


def flow_run_of(store: str, summary: dict[str, Any]) -> str:
    """The Prefect flow run behind a `--json` summary, from its MLflow run's tag."""
    return str(MlflowClient(store).get_run(summary["mlflow_run_id"]).data.tags["prefect.flow_run_id"])


def shard_task_runs(flow_run: str, expected: int, timeout_s: float = 30.0) -> list[Any]:
    """The flow run's explain-shard task runs, as the Prefect API (and so the UI) has them: once `expected` of
    them are there in a final state (the server records task runs in batches flushed every 5 s)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run)]))
            )
            shards = sorted((r for r in runs if r.name.startswith("explain-shard-")), key=lambda r: r.name)
            settled = len(shards) == expected and all(
                r.state is not None and r.state.is_final() for r in shards
            )
            if settled or time.monotonic() > deadline:
                return shards
            time.sleep(0.2)


def flow_run_logs(store: str, summary: dict[str, Any]) -> list[str]:
    """The log lines the Prefect API holds for the flow run behind a `--json` summary (what the UI shows)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(flow_run_of(store, summary))]))
        )
    return [log.message for log in logs]


def exact_shapley(
    function: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    background: np.ndarray,
    link: Callable[[np.ndarray], np.ndarray] = lambda v: v,
) -> np.ndarray:
    """Shapley values by enumerating every coalition: v(S) = link(mean over background of f(x_S, b_rest))."""
    from itertools import combinations
    from math import factorial

    m = len(x)

    def value(subset: tuple[int, ...]) -> float:
        rows = background.copy()
        rows[:, list(subset)] = x[list(subset)]
        return float(link(np.mean(function(rows))))

    cache = {s: value(s) for k in range(m + 1) for s in combinations(range(m), k)}
    phi = np.zeros(m)
    for i in range(m):
        others = [j for j in range(m) if j != i]
        for k in range(m):
            weight = factorial(k) * factorial(m - k - 1) / factorial(m)
            for subset in combinations(others, k):
                with_i = tuple(sorted((*subset, i)))
                phi[i] += weight * (cache[with_i] - cache[subset])
    return phi


def wait_for(url: str, process: subprocess.Popen[Any], seconds: float = 120) -> None:
    """Wait until `url` answers 200, failing early if the server's process exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server for {url} exited with {process.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not come up")


def days_since_epoch(frame: pd.DataFrame) -> np.ndarray:
    """A model's first step for time columns (a FunctionTransformer): every column as floats, a time (naive or
    with a zone) as days since 1970, a missing one NaN. Module level, so a pickled model can name it."""
    columns = []
    for name in frame.columns:
        column = frame[name]
        if pd.api.types.is_datetime64_any_dtype(column):
            naive = column.dt.tz_convert(None) if column.dt.tz is not None else column
            days = (naive - pd.Timestamp("1970-01-01")).dt.total_seconds() / 86400.0
            columns.append(days.to_numpy(dtype=float, na_value=np.nan))
        else:
            columns.append(column.to_numpy(dtype=float, na_value=np.nan))
    return np.column_stack(columns)
