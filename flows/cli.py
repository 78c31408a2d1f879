"""The `shapline` command: run, validate, schema, demo, deploy, serve, compare, reference, endpoint."""

from __future__ import annotations

import argparse
import atexit
import io
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, cast

from shapline.flows import compare_cli, endpoint_cli
from shapline.flows.demo import DEFAULT_CONFIG
from shapline.flows.deploy import DEFAULT_POOL
from shapline.tasks.common.errors import (
    AttributionDrift,
    ConfigError,
    PrefectUnavailable,
    ShaplineError,
    UnexpectedError,
    one_line,
)
from shapline.tasks.common.redact import redact, redact_logs, redact_value
from shapline.tasks.monitoring.drift import drift_sentence
from shapline.tasks.results.summary import accuracy_sentence
from shapline.tasks.tracking.uris import open_hint, run_page

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# This machine (and many production ones) cannot reach Prefect's telemetry endpoint; don't try.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Nor MLflow's: its telemetry thread also sets and unsets a variable in os.environ while the flow runs.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# A progress bar per downloaded baseline artifact is noise in a run's output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow's own "View run ... at: <url>" line would print a password typed into output.tracking_uri.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# Prefect's server writes each task run's state events one transaction at a time (its task run recorder's
# batch_size is 1): ~20 ms of the server's CPU per shard task, measured, taken from the cores the shards
# compute on when the server is local. Written in batches: ~6 ms. Flushed every 5 s (Prefect's own longest
# wait) rather than every second, the flushes of a short explain phase land after it: two process workers
# computed in 0.890-0.902 of two cores' time in the phase, against 0.873-0.886 with 1 s (the server's CPU
# in it 60-70 ms against 95-110; 16 interleaved runs). A task run's state reaches the Prefect UI up to 5 s
# later; a server that stops flushes what it holds. For the temporary server a run starts without
# PREFECT_API_URL (and the benchmarks'); docker/compose.yaml gives its server the same.
PREFECT_SERVER_DEFAULTS = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "5",
}
for _name, _value in PREFECT_SERVER_DEFAULTS.items():
    os.environ.setdefault(_name, _value)


class _NoTracebacks(logging.Filter):
    """Prefect logs every failure with its traceback; a user error needs one line, not fifty."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        return True


_QUIET = _NoTracebacks()


def _quiet_tracebacks() -> None:
    """No library's traceback on the console without --debug (MLflow's store, SQLAlchemy, Prefect's engine):
    on every handler that exists now; called again once the flow's imports have added theirs."""
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if _QUIET not in handler.filters:
                handler.addFilter(_QUIET)


class _RedactingStream(io.TextIOBase):
    """sys.stdout or sys.stderr for the duration of a command: every line written passes through redact(),
    whoever writes it (MLflow prints to stdout directly, past shapline's log filters).

    Line-buffered: a line is redacted and written through once it is complete (a credential split across
    two writes is still one line), the rest on flush(). Whatever it does not override (encoding, isatty,
    fileno, buffer...) is the wrapped stream's; bytes written to .buffer are not redacted.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self._pending = ""
        self._lock = threading.Lock()  # Prefect's task threads and MLflow's write too

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            if "\n" in self._pending:
                lines, _, self._pending = self._pending.rpartition("\n")
                self.stream.write(redact(lines + "\n"))
                self.stream.flush()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self.stream.write(redact(self._pending))
                self._pending = ""
        self.stream.flush()

    def close(self) -> None:
        """Flush; the wrapped stream is not this object's to close."""
        if not self.stream.closed:
            self.flush()

    @property
    def closed(self) -> bool:
        return self.stream.closed

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.stream.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self.stream.errors

    @property
    def line_buffering(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        if name == "stream":  # not set yet (or torn down): never recurse
            raise AttributeError(name)
        return getattr(self.stream, name)


@contextmanager
def _redacted_streams() -> Iterator[None]:
    """sys.stdout and sys.stderr redact every line while the block runs; the streams that were there are
    put back (unless someone else replaced them meanwhile, as pytest's capsys does between tests)."""
    originals = sys.stdout, sys.stderr
    wrappers = cast(TextIO, _RedactingStream(sys.stdout)), cast(TextIO, _RedactingStream(sys.stderr))
    sys.stdout, sys.stderr = wrappers
    try:
        yield
    finally:
        for wrapper in wrappers:
            if not wrapper.closed:
                wrapper.flush()
        if sys.stdout is wrappers[0]:
            sys.stdout = originals[0]
        if sys.stderr is wrappers[1]:
            sys.stderr = originals[1]


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException raised in the main thread, so no `except Exception` swallows it and
    every context manager of the run unwinds: the MLflow run ends FAILED (tagged terminated)."""

    def __init__(self) -> None:
        super().__init__("terminated (SIGTERM)")
        self.signal = int(signal.SIGTERM)


# The shell's convention for a process ended by SIGTERM: 128 + 15.
TERMINATED_EXIT_CODE = 128 + signal.SIGTERM


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread while the block runs (the default handler would end the
    process at once, leaving the MLflow run RUNNING).

    Prefect's flow engine puts its own handler in for the flow run: it raises TerminationSignal inside the
    flow (the run unwinds, Prefect marks it Crashed), then restores the handler it found, this one, and
    sends SIGTERM again, which raises Terminated out of the flow to the CLI.
    """
    if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
        yield
        return

    def terminate(number: int, frame: FrameType | None) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _leave_if_stuck(code: int) -> None:
    """After SIGTERM: if a thread the interpreter would join at exit is still alive (stuck in a model call),
    end the process now rather than hang; exit handlers first (they stop a temporary Prefect server)."""
    current = threading.current_thread()
    stuck = [t for t in threading.enumerate() if t is not current and t.is_alive() and not t.daemon]
    if not stuck:
        return
    logging.getLogger(__name__).debug("leaving with threads still running: %s", [t.name for t in stuck])
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _say(text: object = "", file: Any = None) -> None:
    """Print one line, redacted: the CLI's output is one of the places a typed credential could leak."""
    print(redact(str(text)), file=file or sys.stdout)


def add_debug_flag(command: argparse.ArgumentParser) -> None:
    """`--debug` after a command too; SUPPRESS keeps the command's default from overwriting the True of
    `shapline --debug run ...`."""
    command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shapline", description="Explain ML models with SHAP, logged to MLflow."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also after the command)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_set(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY.PATH=VALUE",
            help="override a config key (value parsed as YAML); repeatable",
        )

    def add_json(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--json", action="store_true", help="end stdout with one JSON object")

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("config", help="the model's YAML config")
        add_set(sub)
        add_json(sub)
        add_debug_flag(sub)
        return sub

    run = with_config("run", "explain the model and log everything to MLflow")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything and print the plan (and endpoint inference estimate), explain nothing",
    )
    with_config("validate", "check the config, the model and the data without explaining")
    schema = commands.add_parser("schema", help="print the config's JSON schema")
    schema.add_argument("--markdown", action="store_true", help="the config reference table instead")
    demo = commands.add_parser("demo", help="train the demo model on real data and explain it (as run does)")
    demo.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="the demo config (default: %(default)s, shipped with shapline)",
    )
    add_set(demo)
    add_json(demo)
    add_debug_flag(demo)
    deploy = commands.add_parser(
        "deploy", help="create or update one Prefect deployment per config, on a work pool"
    )
    deploy.add_argument("configs", nargs="+", metavar="CONFIG", help="the models' YAML configs")
    deploy.add_argument(
        "--pool",
        default=DEFAULT_POOL,
        help="work pool (a process pool, created if missing; default: %(default)s)",
    )
    add_set(deploy)
    add_json(deploy)
    add_debug_flag(deploy)
    serve = commands.add_parser(
        "serve",
        help="deploy the configs as `deploy` does and run their work pool's worker in this process",
    )
    serve.add_argument("configs", nargs="+", metavar="CONFIG", help="the models' YAML configs")
    serve.add_argument("--pool", default=DEFAULT_POOL, help="work pool (as for deploy; default: %(default)s)")
    add_set(serve)
    add_debug_flag(serve)
    endpoint_cli.add_parser(commands)
    add_debug_flag(compare_cli.add_parser(commands))
    add_debug_flag(compare_cli.add_reference_parser(commands))
    return parser


def _print_run_summary(summary: dict[str, Any]) -> None:
    """The lines a person reads at the end of a run: what was explained, drift, where it is in MLflow."""
    _say(
        f"explained {summary['rows_explained']} rows in {summary['shards']} "
        f"shard{'s' if summary['shards'] != 1 else ''} "
        f"({summary['algorithm']}, link {summary['link']}) in {summary['duration_s']:.1f} s"
    )
    _say(f"additivity max error: {summary['additivity_max_error']:.3g}")
    if accuracy := accuracy_sentence(summary):
        _say(accuracy)
    _say(f"top features: {', '.join(summary['top_features'])}")
    if summary.get("attribution_ndcg") is not None:
        moved = [(d["feature"], d["relative_change"]) for d in summary.get("importance_drift") or []]
        _say(
            drift_sentence(
                summary["attribution_ndcg"],
                summary.get("ndcg_threshold"),
                summary["baseline_run_id"],
                moved,
                summary.get("max_importance_change"),
            )
        )
    elif summary.get("baseline_reason"):
        _say(f"no comparison: {summary['baseline_reason']}")
    _say(
        f"MLflow run {summary['mlflow_run_id']} in experiment '{summary['experiment']}' "
        f"(id {summary['experiment_id']}), tracking URI {summary['tracking_uri']}"
    )
    page = run_page(summary["tracking_uri"], summary["experiment_id"], summary["mlflow_run_id"])
    hint = open_hint(summary["tracking_uri"])
    if hint:
        _say(f"open it with: {hint}  (then {page})")
    else:
        _say(f"open it at: {page}")


# Without PREFECT_API_URL every run starts a temporary Prefect server, which Prefect gives 20 s; on a
# busy machine (a load of 3.5 on two cores) that is not enough. Unless the user set their own, shapline
# gives it this long.
GENEROUS_SERVER_START_S = 300
# That server's work while shards run is bookkeeping the flow does not wait for (the task runs' events and
# logs), yet at normal priority it takes CPU from the workers. SHAPLINE_SERVER_NICENESS runs it at a lower
# priority once started: with 19, two process workers explained four shards faster in five of six
# interleaved runs (medians 7-27%; 4% slower in one); but on a machine busier than its cores the whole run
# waits on the starved server (the demo under four spinning processes: 68 s at 0, 75 s at 5, 92 s at 10,
# 268 s at 19). So it is off unless asked for (docs/performance.md).
SERVER_NICENESS_ENV = "SHAPLINE_SERVER_NICENESS"


@contextmanager
def _generous_server_start() -> Iterator[None]:
    """Allow a temporary Prefect server minutes to start (unless the user set a timeout); one line if it never does.

    The server is started here, before the flow, so that it runs at SHAPLINE_SERVER_NICENESS from the first shard.
    """
    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
        temporary_settings,
    )

    niceness = _server_niceness()
    ephemeral = get_current_settings().server.ephemeral
    chosen = "startup_timeout_seconds" in ephemeral.model_fields_set
    timeout = ephemeral.startup_timeout_seconds if chosen else GENEROUS_SERVER_START_S
    allowed = (
        nullcontext()
        if chosen
        else temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: timeout})
    )
    try:
        with allowed:
            _start_temporary_server(niceness)
            yield
    except RuntimeError as exc:
        if "ephemeral Prefect API server" not in str(exc):
            raise
        raise PrefectUnavailable(
            f"the temporary Prefect server did not start within {timeout} s (is the machine very busy?): "
            "start one with `prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api, "
            "or allow it longer with PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
        ) from exc


def _server_niceness() -> int:
    """The niceness a temporary Prefect server runs at: SHAPLINE_SERVER_NICENESS, or 0 (as Prefect started it)."""
    raw = os.environ.get(SERVER_NICENESS_ENV, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= 19:
        raise ConfigError(f"{SERVER_NICENESS_ENV}: expected a whole number from 0 to 19, got {raw!r}")
    return value


def _start_temporary_server(niceness: int) -> None:
    """Start the temporary Prefect server the run would start at its first call, and lower its CPU priority.

    Nothing happens at niceness 0 (the flow starts the server as Prefect does), nor with PREFECT_API_URL
    set: a server someone else started keeps its priority.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if not niceness or PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    from shapline.tasks.compute.priority import lower_priority

    server = SubprocessASGIServer()  # the instance Prefect's client uses when no API URL is set
    server.start()
    if server.server_process is not None:
        lower_priority(server.server_process.pid, niceness)


def _run(config_path: str, overrides: list[str], as_json: bool, debug: bool = False) -> int:
    from shapline.tasks.common.config import load_config

    load_config(config_path, overrides)  # fail fast on a bad config, before Prefect starts
    from shapline.flows.explain import explain_model
    from shapline.flows.parameters import ExplainParameters

    if not debug:
        _quiet_tracebacks()  # the flow's imports (MLflow, Great Expectations) brought handlers of their own
    redact_logs()
    try:
        with _generous_server_start():
            # As one object: Prefect stores it with the overrides redacted (a typed password stays here).
            finished = explain_model(
                parameters=ExplainParameters(
                    config_path=str(Path(config_path).resolve()), overrides=overrides
                )
            )
    except AttributionDrift as drift:
        # The explanation is complete (its MLflow run FINISHED): the summary, then the one line, exit 3.
        if drift.summary:
            _print_run_summary(drift.summary)
        _say(f"shapline: error: {drift}", file=sys.stderr)
        if as_json:
            _say(json.dumps(redact_value({**drift.summary, "error": str(drift)}), default=str))
        return drift.exit_code
    summary = finished.to_json()
    _print_run_summary(summary)
    if as_json:
        _say(json.dumps(redact_value(summary), default=str))
    return 0


def _validate(config_path: str, overrides: list[str], as_json: bool) -> int:
    from shapline.flows.check import check_config

    report = check_config(config_path, overrides)
    for line in report["lines"]:
        _say(line)
    if as_json:
        _say(json.dumps({k: v for k, v in report.items() if k != "lines"}, default=str))
    return 0 if report["ok"] else 1


def _schema(markdown: bool) -> int:
    from shapline.flows.reference import config_reference
    from shapline.tasks.common.config import config_schema

    _say(config_reference() if markdown else json.dumps(config_schema(), indent=2))
    return 0


def _deploy(configs: list[str], pool: str, overrides: list[str], as_json: bool) -> int:
    from shapline.flows.deploy import deploy

    deployed = deploy(configs, pool, overrides)
    for name, deployment_id in deployed:
        _say(f"deployment shapline-explain/{name} ({deployment_id}) on work pool {pool}")
    _say(
        f"start a worker with: prefect worker start --pool {pool}  "
        f"(or run `shapline serve` with the same configs: it deploys and works in one process)"
    )
    if as_json:
        _say(
            json.dumps(
                {
                    "status": "DEPLOYED",
                    "pool": pool,
                    "deployments": {name: str(deployment_id) for name, deployment_id in deployed},
                }
            )
        )
    return 0


def _compare(run_a: str, run_b: str, tracking_uri: str | None, as_json: bool) -> int:
    lines, result = compare_cli.compare(run_a, run_b, tracking_uri)
    for line in lines:
        _say(line)
    if as_json:
        _say(json.dumps(redact_value(result), default=str))
    return 0


def _reference(run: str, tracking_uri: str | None, as_json: bool) -> int:
    lines, result = compare_cli.reference(run, tracking_uri)
    for line in lines:
        _say(line)
    if as_json:
        _say(json.dumps(redact_value(result), default=str))
    return 0


def _demo(config_path: str, overrides: list[str], as_json: bool, debug: bool = False) -> int:
    from shapline.flows.demo import demo_config, prepare_demo

    config_path, said = demo_config(config_path)
    for line in [*said, *prepare_demo(config_path)]:
        _say(line)
    return _run(config_path, overrides, as_json, debug)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `shapline` console script; returns the exit code."""
    with _redacted_streams():
        return _command(argv)


def _command(argv: list[str] | None) -> int:
    """Parse the command line and run the command: one line on stderr and an exit code for any failure."""
    args = _parser().parse_args(argv)
    debug = args.debug or os.environ.get("SHAPLINE_DEBUG") == "1"
    if not debug:
        _quiet_tracebacks()
    redact_logs()
    as_json = getattr(args, "json", False)
    try:
        if args.command == "run" and args.dry_run:
            return _validate(args.config, args.overrides, as_json)
        if args.command == "run":
            with _sigterm_raises():
                return _run(args.config, args.overrides, as_json, debug)
        if args.command == "endpoint":
            return endpoint_cli.run(args)
        if args.command == "deploy":
            return _deploy(args.configs, args.pool, args.overrides, as_json)
        if args.command == "serve":
            from shapline.flows.deploy import serve

            serve(args.configs, args.pool, args.overrides, _say)
            return 0
        if args.command == "compare":
            return _compare(args.run_a, args.run_b, args.tracking_uri, as_json)
        if args.command == "reference":
            return _reference(args.run, args.tracking_uri, as_json)
        if args.command == "validate":
            return _validate(args.config, args.overrides, as_json)
        if args.command == "schema":
            return _schema(args.markdown)
        with _sigterm_raises():
            return _demo(args.config, args.overrides, as_json, debug)
    except Terminated:
        code = _fail("terminated (SIGTERM)", TERMINATED_EXIT_CODE, as_json)
        _leave_if_stuck(code)
        return code
    except ShaplineError as exc:
        if debug:
            raise
        hint = " (rerun with --debug for the traceback)" if isinstance(exc, UnexpectedError) else ""
        return _fail(f"{one_line(exc, 500)}{hint}", exc.exit_code, as_json)
    except KeyboardInterrupt:
        return _fail("interrupted", 130, as_json)
    except Exception as exc:
        if debug:
            raise
        message = one_line(f"{type(exc).__name__}: {exc}", 500)
        return _fail(f"{message} (rerun with --debug for the traceback)", 1, as_json)


def _fail(message: str, code: int, as_json: bool) -> int:
    message = redact(message)
    _say(f"shapline: error: {message}", file=sys.stderr)
    if as_json:
        _say(json.dumps({"status": "FAILED", "error": message}))
    return code


if __name__ == "__main__":
    sys.exit(main())
