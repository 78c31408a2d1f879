"""The `shapline` command: run, validate, schema, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from flows import endpoint_cli
from tasks.errors import ShaplineError

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# This machine (and many production ones) cannot reach Prefect's telemetry endpoint; don't try.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


class _NoTracebacks(logging.Filter):
    """Prefect logs every failure with its traceback; a user error needs one line, not fifty."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        return True


def _quiet_tracebacks() -> None:
    quiet = _NoTracebacks()
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        logger.addFilter(quiet)
        for handler in logger.handlers:
            handler.addFilter(quiet)
    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shapline", description="Explain ML models with SHAP, logged to MLflow."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("config", help="the model's YAML config")
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY.PATH=VALUE",
            help="override a config key (value parsed as YAML); repeatable",
        )
        sub.add_argument("--json", action="store_true", help="end stdout with one JSON object")
        sub.add_argument("--debug", action="store_true", help="show tracebacks")
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
    demo = commands.add_parser("demo", help="train the demo model on real data and explain it")
    demo.add_argument(
        "--config", default="configs/penguins.yaml", help="the demo config (default: %(default)s)"
    )
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    demo.add_argument("--json", action="store_true")
    demo.add_argument("--debug", action="store_true")
    deploy = commands.add_parser("deploy", help="create or update one Prefect deployment per config")
    deploy.add_argument("configs", nargs="+", metavar="CONFIG")
    deploy.add_argument("--pool", default="shapline", help="work pool (a process pool, created if missing)")
    deploy.add_argument("--json", action="store_true")
    deploy.add_argument("--debug", action="store_true")
    serve = commands.add_parser("serve", help="serve the configs' deployments from this process (no worker)")
    serve.add_argument("configs", nargs="+", metavar="CONFIG")
    serve.add_argument("--debug", action="store_true")
    endpoint_cli.add_parser(commands)
    return parser


def _print_run_summary(summary: dict[str, Any]) -> None:
    print(
        f"explained {summary['rows_explained']} rows in {summary['shards']} shards "
        f"({summary['algorithm']}, link {summary['link']}) in {summary['duration_s']:.1f} s"
    )
    print(f"additivity max error: {summary['additivity_max_error']:.3g}")
    print(f"top features: {', '.join(summary['top_features'])}")
    print(
        f"MLflow run {summary['mlflow_run_id']} in experiment '{summary['experiment']}' "
        f"(id {summary['experiment_id']}), tracking URI {summary['tracking_uri']}"
    )
    if summary["tracking_uri"].startswith("sqlite:"):
        print(
            f"open it with: mlflow ui --backend-store-uri {summary['tracking_uri']}  (then http://127.0.0.1:5000)"
        )
    else:
        print(f"open it at: {summary['run_url']}")


def _run(config_path: str, overrides: list[str], as_json: bool) -> int:
    from flows.config import load_config

    load_config(config_path, overrides)  # fail fast on a bad config, before Prefect starts
    from flows.config import ExplainParameters
    from flows.explain import explain_model

    summary = explain_model(
        ExplainParameters(config_path=str(Path(config_path).resolve()), overrides=overrides)
    )
    _print_run_summary(summary)
    if as_json:
        print(json.dumps(summary, default=str))
    return 0


def _validate(config_path: str, overrides: list[str], as_json: bool) -> int:
    from flows.check import check_config

    report = check_config(config_path, overrides)
    for line in report["lines"]:
        print(line)
    if as_json:
        print(json.dumps({k: v for k, v in report.items() if k != "lines"}, default=str))
    return 0 if report["ok"] else 1


def _schema(markdown: bool) -> int:
    from flows.config import config_schema
    from flows.reference import config_reference

    print(config_reference() if markdown else json.dumps(config_schema(), indent=2))
    return 0


def _deploy(configs: list[str], pool: str, as_json: bool) -> int:
    from flows.deploy import deploy

    deployed = deploy(configs, pool)
    for name, deployment_id in deployed:
        print(f"deployment shapline-explain/{name} ({deployment_id}) on work pool {pool}")
    print(f"start a worker with: prefect worker start --pool {pool}")
    if as_json:
        print(
            json.dumps(
                {
                    "status": "DEPLOYED",
                    "pool": pool,
                    "deployments": {name: str(deployment_id) for name, deployment_id in deployed},
                }
            )
        )
    return 0


def _demo(config_path: str, overrides: list[str], as_json: bool) -> int:
    from flows.demo import prepare_demo

    for line in prepare_demo(config_path):
        print(line)
    return _run(config_path, overrides, as_json)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `shapline` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    debug = args.debug or os.environ.get("SHAPLINE_DEBUG") == "1"
    if not debug:
        _quiet_tracebacks()
    as_json = getattr(args, "json", False)
    try:
        if args.command == "run" and args.dry_run:
            return _validate(args.config, args.overrides, as_json)
        if args.command == "run":
            return _run(args.config, args.overrides, as_json)
        if args.command == "endpoint":
            return endpoint_cli.run(args)
        if args.command == "deploy":
            return _deploy(args.configs, args.pool, as_json)
        if args.command == "serve":
            from flows.deploy import serve

            serve(args.configs)
            return 0
        if args.command == "validate":
            return _validate(args.config, args.overrides, as_json)
        if args.command == "schema":
            return _schema(args.markdown)
        return _demo(args.config, args.overrides, as_json)
    except ShaplineError as exc:
        if debug:
            raise
        return _fail(str(exc), exc.exit_code, as_json)
    except KeyboardInterrupt:
        return _fail("interrupted", 130, as_json)
    except Exception as exc:
        if debug:
            raise
        message = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        return _fail(f"{message} (rerun with --debug for the traceback)", 1, as_json)


def _fail(message: str, code: int, as_json: bool) -> int:
    print(f"shapline: error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"status": "FAILED", "error": message}))
    return code


if __name__ == "__main__":
    sys.exit(main())
