"""Log a run to MLflow through an explicit client and run id (never the per-thread fluent run)."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from shapline.tasks.common.errors import TrackingError, one_line
from shapline.tasks.common.liveness import pid_alive, this_host
from shapline.tasks.common.redact import redact
from shapline.tasks.tracking.uris import is_http, run_page, sqlite_database

ERROR_TAG = "shapline.error"

# MLflow prints "View run <name> at: <url>" to stdout when a run on a tracking server ends, the URL
# with any user:password typed into output.tracking_uri: past every redaction shapline does. Unless the
# user asked for it, it is not printed (the CLI sets this too; here it holds for deployments' flow runs).
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


@dataclass(frozen=True)
class TrackedRun:
    """Where a run lives: enough to log to it from any thread or process."""

    tracking_uri: str
    experiment_id: str
    run_id: str

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)


def _artifact_root(tracking_uri: str) -> str | None:
    """For a local sqlite store, keep artifacts beside the database rather than in the working folder."""
    database = sqlite_database(tracking_uri)
    return None if database is None else (database.resolve().parent / "mlartifacts").as_uri()


# MLflow 3's UI opens an experiment on the view its kind names; without it, on the GenAI overview
# (traces, token usage). shapline's experiments are model development: the runs list.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def ensure_experiment(client: MlflowClient, tracking_uri: str, name: str) -> str:
    """The experiment's id, creating it if needed (safe when two runs create it at once), of the kind
    MLflow's UI opens on its runs."""
    found = client.get_experiment_by_name(name)
    if found is None:
        root = _artifact_root(tracking_uri)
        try:
            experiment_id = client.create_experiment(
                name,
                artifact_location=f"{root}/{_slug(name)}" if root else None,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except MlflowException:
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
        else:
            return experiment_id
    if EXPERIMENT_KIND_TAG not in found.tags:  # one made before shapline set the kind
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return found.experiment_id


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


HOST_TAG = "shapline.host"
PID_TAG = "shapline.pid"


def end_orphaned_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the experiment's RUNNING runs started on this host by a process that no longer exists.

    A run whose process was killed (SIGKILL, OOM, a lost machine) cannot end itself; the next run
    in the experiment ends it, tagged with why, so nobody mistakes it for one still computing.
    """
    host = this_host()
    ended = []
    for run in client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
        max_results=200,
    ):
        pid = int(run.data.tags.get(PID_TAG, "0") or 0)
        if pid_alive(pid):
            continue
        client.set_tag(
            run.info.run_id, ERROR_TAG, f"its process (pid {pid} on {host}) ended without finishing the run"
        )
        client.set_terminated(run.info.run_id, status="KILLED")
        ended.append(run.info.run_id)
    return ended


@contextmanager
def first_contact(tracking_uri: str) -> Iterator[None]:
    """Serialise the first contact with a local sqlite store across processes.

    MLflow creates a new store's tables (its schema migrations) on first contact; two runs that start
    together on a new mlflow.db both migrate and one dies ("Online migration expected to match one
    row"). A lock file beside the database makes the second wait the first's few seconds.
    """
    database = sqlite_database(tracking_uri)
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        yield
        return
    with open(database.with_name(database.name + ".lock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _reason(exc: MlflowException) -> str:
    """MLflow's message without the SQL statement and parameters SQLAlchemy appends to it."""
    text = one_line(str(exc.message).split("[SQL:", 1)[0], 10_000)
    return one_line(re.sub(r"^\((?:sqlite3|psycopg2?|pymysql)\.\w+\)\s*", "", text))


def start_run(tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> TrackedRun:
    """Create a RUNNING run in the experiment, tagged with this host and pid; end killed runs' leftovers."""
    try:
        return _start_run(tracking_uri, experiment, run_name, tags)
    except MlflowException as exc:
        raise TrackingError(
            f"output.tracking_uri: cannot start a run in experiment {experiment!r} of the MLflow store at "
            f"{tracking_uri}: {_reason(exc)}"
        ) from exc


def _start_run(tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> TrackedRun:
    with first_contact(tracking_uri):
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = ensure_experiment(client, tracking_uri, experiment)
    end_orphaned_runs(client, experiment_id)
    tags = {
        key: redact(str(value))
        for key, value in {**tags, HOST_TAG: this_host(), PID_TAG: os.getpid()}.items()
    }
    run = client.create_run(experiment_id, run_name=redact(run_name), tags=tags)
    return TrackedRun(tracking_uri, experiment_id, run.info.run_id)


def log_values(
    run: TrackedRun,
    params: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    tags: dict[str, str] | None = None,
) -> None:
    """Log params, metrics and tags in one batch."""
    now = int(time.time() * 1000)
    run.client.log_batch(
        run.run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
        params=[Param(k, redact(str(v))) for k, v in (params or {}).items()],
        tags=[RunTag(k, redact(str(v))) for k, v in (tags or {}).items()],
    )


def artifact_folder(run: TrackedRun) -> Path | None:
    """Where a local MLflow store keeps this run's artifacts (None for a server or a remote artifact store)."""
    try:
        uri = run.client.get_run(run.run_id).info.artifact_uri
    except MlflowException:
        return None
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    return Path(uri) if "://" not in uri else None


def log_artifacts(run: TrackedRun, folder: str | Path, skip: Iterable[str] = ()) -> None:
    """Upload every file under `folder` but the top-level names in `skip`, keeping relative paths as names."""
    skipped = set(skip)
    if not skipped:
        run.client.log_artifacts(run.run_id, str(folder))
        return
    for path in sorted(Path(folder).iterdir()):
        if path.name in skipped:
            continue
        if path.is_dir():
            run.client.log_artifacts(run.run_id, str(path), path.name)
        else:
            run.client.log_artifact(run.run_id, str(path))


# What a SQL store says when a row another transaction just inserted is inserted again (SQLite, PostgreSQL,
# MySQL), through MLflow's store or its server's BAD_REQUEST.
_DUPLICATE_ROW = re.compile(
    r"IntegrityError|UniqueViolation|UNIQUE constraint failed|duplicate key|Duplicate entry"
)
_INPUT_ATTEMPTS = 4


def log_inputs(run: TrackedRun, datasets: list[Any], model_ids: list[str] | None = None) -> None:
    """Log dataset inputs (mlflow.entities.DatasetInput) and models the run used (MLflow 3 logged models).

    MLflow's store looks a dataset up by (experiment, name, digest) and inserts it if absent, unlocked: two
    runs of the same data in one experiment that log it at once (a scheduled run and one from the UI) both
    insert, and one fails on the unique key (18 of 60 concurrent calls, measured on a sqlite store). Its
    transaction is rolled back whole and the dataset is then there, so the call is made again and links it.
    """
    from mlflow.entities import LoggedModelInput

    models = [LoggedModelInput(model_id) for model_id in model_ids or []]
    for attempt in range(1, _INPUT_ATTEMPTS + 1):
        try:
            run.client.log_inputs(run.run_id, datasets=datasets, models=models or None)
            return
        except MlflowException as exc:
            if attempt == _INPUT_ATTEMPTS or not _DUPLICATE_ROW.search(str(exc)):
                raise
            time.sleep(0.05 * attempt)


def log_artifact(run: TrackedRun, path: str | Path, artifact_dir: str | None = None) -> None:
    """Upload one file."""
    run.client.log_artifact(run.run_id, str(path), artifact_dir)


@contextmanager
def mlflow_run(
    tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str]
) -> Iterator[TrackedRun]:
    """A run that ends FINISHED only when the block completes, FAILED (with the error as a tag) otherwise."""
    run = start_run(tracking_uri, experiment, run_name, tags)
    try:
        yield run
    except BaseException as exc:
        message = one_line(redact(_why_it_ended(exc)), 4000)
        try:
            run.client.set_tag(run.run_id, ERROR_TAG, message)
        finally:
            run.client.set_terminated(run.run_id, status="FAILED")
        raise
    run.client.set_terminated(run.run_id, status="FINISHED")


def _why_it_ended(exc: BaseException) -> str:
    """The error, or the signal that ended the run: Prefect's TerminationSignal and the CLI's own carry the
    signal's number and no message."""
    number = getattr(exc, "signal", None)
    if not isinstance(exc, Exception) and isinstance(number, int):
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"terminated ({name})"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (SIGINT)"
    return f"{type(exc).__name__}: {exc}"


def run_url(run: TrackedRun) -> str:
    """Where a person opens the run: the server's page, or the store URI for a local store."""
    if is_http(run.tracking_uri):
        return run_page(run.tracking_uri, run.experiment_id, run.run_id)
    return f"{run.tracking_uri} (experiment {run.experiment_id}, run {run.run_id})"
