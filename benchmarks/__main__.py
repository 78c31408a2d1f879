"""`python -m benchmarks [--quick] [--only NAME] [--out DIR] [--set NAME.KEY=VALUE]`: run the comparisons."""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

# Light imports only up here: spawned shard workers import this module again as __mp_main__.
COMPARISONS = ("kernel", "percore", "overhead", "endpoint", "tree", "scaling", "accuracy")
HERE = Path(__file__).resolve().parent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="shapline vs plain shap/xgboost, side by side in alternation; medians, ratios, equality checks.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, one repetition, no plots (a smoke test of the harness)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=COMPARISONS,
        metavar="NAME",
        help=f"run only this comparison: {', '.join(COMPARISONS)}",
    )
    parser.add_argument(
        "--out", type=Path, default=HERE, help="where results.json and results.md go (default: %(default)s)"
    )
    parser.add_argument("--reps", type=int, default=None, help="repetitions per side (default: 3, quick: 1)")
    parser.add_argument(
        "--set",
        dest="sizes",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="a comparison's size knob, e.g. kernel.rows=96 or tree.rows=200000 (value parsed as YAML)",
    )
    parser.add_argument("--cache", type=Path, default=None, help="where generated data and models are kept")
    return parser


def _params(name: str, module: Any, quick: bool, sizes: list[str]) -> dict[str, Any]:
    params = dict(module.QUICK if quick else module.FULL)
    for item in sizes:
        key, _, raw = item.partition("=")
        owner, _, knob = key.partition(".")
        if owner != name:
            continue
        if knob not in params:
            raise SystemExit(f"--set {item}: {name} has no knob {knob!r}; knobs: {', '.join(params)}")
        params[knob] = yaml.safe_load(raw)
    return params


def _log(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    """Run the selected comparisons and write results.json and results.md."""
    args = _parser().parse_args(argv)
    from benchmarks.workloads import DEFAULT_CACHE, EXTRA_OVERRIDES_ENV, prepare_environment

    prepare_environment()
    if args.quick:
        # Plots cost about a second per flow run and prove nothing about the harness.
        os.environ[EXTRA_OVERRIDES_ENV] = "output.plots=[]"
    from benchmarks.harness import ComparisonResult, Context, machine, render_console, write_report
    from benchmarks.workloads import prefect_server, warm_up

    started = time.perf_counter()
    names = args.only or list(COMPARISONS)
    for item in args.sizes:
        if item.partition(".")[0] not in COMPARISONS:
            raise SystemExit(f"--set {item}: unknown comparison; choose from {', '.join(COMPARISONS)}")
    reps = args.reps or (1 if args.quick else 3)
    report: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "benchmarks", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "reps": reps,
        "machine": machine(),
        "comparisons": [],
    }
    cache = args.cache or DEFAULT_CACHE
    with tempfile.TemporaryDirectory(prefix="shapline-bench-") as work, prefect_server() as server_s:
        report["prefect_server_start_s"] = round(server_s, 2)
        context = Context(Path(work), cache, reps, args.quick, _log, server_s)
        _log("== warm-up: imports and one tiny flow run (first-run costs are measured in 'overhead')")
        warm_up(context)
        for name in names:
            module = importlib.import_module(f"benchmarks.{name}")
            params = _params(name, module, args.quick, args.sizes)
            _log(f"== {name} {params}")
            began = time.perf_counter()
            try:
                result = module.run(context, params)
            except Exception:
                result = ComparisonResult(name=name, title=name, workload={}, error=traceback.format_exc())
                _log(result.error or "")
            result.seconds = time.perf_counter() - began
            result.workload.setdefault("knobs", dict(params))
            report["comparisons"].append(result.to_json())
            # Write after every comparison so a long run leaves its finished part behind.
            report["seconds"] = time.perf_counter() - started
            report["load_average_end"] = machine()["load_average"]
            write_report(report, args.out)
    json_path, md_path = write_report(report, args.out)
    print(render_console(report))  # noqa: T201  (this is the command's output)
    print(f"\nwrote {json_path} and {md_path} in {report['seconds']:.0f} s")  # noqa: T201
    failed = [c["name"] for c in report["comparisons"] if c["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
