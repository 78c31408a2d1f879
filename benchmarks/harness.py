"""Run the sides of a comparison in alternation, check they agree, and report medians and ratios."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Measurement:
    """One run of one side: wall seconds, the values it produced, and side-specific numbers."""

    seconds: float
    values: np.ndarray | None = None
    extra: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Side:
    """One way of doing the comparison's work; `run` does it once and measures it."""

    name: str
    run: Callable[[], Measurement]
    description: str = ""


@dataclass(frozen=True)
class Tolerance:
    """The np.allclose tolerance two sides' values must meet, and why it is that loose."""

    rtol: float
    atol: float
    why: str


@dataclass(frozen=True)
class Ratio:
    """A speed (or memory) ratio between two sides' medians, with the target it should meet."""

    name: str
    numerator: str
    denominator: str
    metric: str = "seconds"
    target: float | None = None
    at_most: bool = False
    note: str = ""
    denominator_metric: str | None = None


@dataclass
class ComparisonResult:
    """Everything one comparison measured: per-side samples, equality checks, ratios and notes."""

    name: str
    title: str
    workload: dict[str, Any]
    sides: dict[str, list[Measurement]] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    ratios: list[dict[str, Any]] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def values_equal(self) -> bool:
        """True when every equality check ran and passed."""
        return bool(self.checks) and all(check["passed"] for check in self.checks)

    def median(self, side: str, metric: str = "seconds") -> float:
        """The median of one side's metric over its repetitions."""
        samples = [m.seconds if metric == "seconds" else m.extra[metric] for m in self.sides[side]]
        return float(statistics.median(samples))

    def check(self, reference: str, other: str, tolerance: Tolerance) -> bool:
        """Compare the first repetition's values of two sides with np.allclose; record the outcome."""
        a = self.sides[reference][0].values
        b = self.sides[other][0].values
        record: dict[str, Any] = {
            "reference": reference,
            "side": other,
            "rtol": tolerance.rtol,
            "atol": tolerance.atol,
            "why": tolerance.why,
        }
        if a is None or b is None or a.shape != b.shape:
            shapes = (None if a is None else a.shape, None if b is None else b.shape)
            record.update(passed=False, max_abs_diff=None, detail=f"shapes differ: {shapes}")
        else:
            diff = np.abs(a - b)
            record.update(
                passed=bool(np.allclose(a, b, rtol=tolerance.rtol, atol=tolerance.atol)),
                max_abs_diff=float(np.nanmax(diff)) if diff.size else 0.0,
                max_abs_value=float(np.nanmax(np.abs(a))) if a.size else 0.0,
                shape=list(a.shape),
            )
        self.checks.append(record)
        return bool(record["passed"])

    def ratio(self, spec: Ratio) -> None:
        """Record median(numerator) / median(denominator); speeds only once the values were shown equal."""
        value = None
        if self.values_equal:
            denominator = self.median(spec.denominator, spec.denominator_metric or spec.metric)
            value = self.median(spec.numerator, spec.metric) / denominator
        metrics = (
            spec.metric if spec.denominator_metric is None else f"{spec.metric} / {spec.denominator_metric}"
        )
        self.record_ratio(
            spec.name,
            value,
            spec.target,
            spec.at_most,
            spec.note,
            numerator=spec.numerator,
            denominator=spec.denominator,
            metric=metrics,
        )

    def record_ratio(
        self,
        name: str,
        value: float | None,
        target: float | None = None,
        at_most: bool = False,
        note: str = "",
        **where: str,
    ) -> None:
        """Record a ratio computed by the comparison itself; withheld while the values are not shown equal."""
        if not self.values_equal:
            value, note = None, "not reported: the sides' values differ"
        met = None
        if value is not None and target is not None:
            met = value <= target if at_most else value >= target
        self.ratios.append(
            {
                "name": name,
                **where,
                "value": value,
                "target": target,
                "target_is_max": at_most,
                "met": met,
                "note": note,
            }
        )

    def to_json(self) -> dict[str, Any]:
        """The comparison as plain JSON (values arrays are not written)."""
        sides = {}
        for name, samples in self.sides.items():
            metrics = sorted({key for m in samples for key in m.extra})
            sides[name] = {
                "description": self.descriptions.get(name, ""),
                "reps": len(samples),
                "failed_attempts": [failure for m in samples for failure in m.failures],
                "seconds": [round(m.seconds, 4) for m in samples],
                "median_s": round(self.median(name), 4),
                "metrics": {
                    key: {
                        "samples": [m.extra.get(key) for m in samples],
                        "median": float(statistics.median(m.extra[key] for m in samples if key in m.extra)),
                    }
                    for key in metrics
                },
            }
        return {
            "name": self.name,
            "title": self.title,
            "status": "error" if self.error else ("ok" if self.values_equal else "values differ"),
            "error": self.error,
            "workload": self.workload,
            "values_equal": self.values_equal,
            "checks": self.checks,
            "sides": sides,
            "ratios": self.ratios,
            "tables": self.tables,
            "notes": self.notes,
            "seconds": round(self.seconds, 1),
        }


def alternate(
    sides: list[Side], reps: int, warmup: bool, log: Callable[[str], None], retries: int = 2
) -> dict[str, list[Measurement]]:
    """Run every side `reps` times, interleaved and with the order rotated each round, after an optional warm-up.

    A run that raises is retried up to `retries` times; the failures are kept on the measurement.
    """
    if not sides:
        return {}
    if warmup:
        for side in sides:
            log(f"  warm-up {side.name}")
            side.run()
    samples: dict[str, list[Measurement]] = {side.name: [] for side in sides}
    for rep in range(reps):
        # Rotating the order spreads slow phases of a noisy machine over every side.
        order = sides[rep % len(sides) :] + sides[: rep % len(sides)]
        for side in order:
            measured = _run_with_retries(side, retries, log)
            samples[side.name].append(measured)
            log(f"  rep {rep + 1}/{reps} {side.name}: {measured.seconds:.2f} s")
    return samples


def _run_with_retries(side: Side, retries: int, log: Callable[[str], None]) -> Measurement:
    """One measurement of a side; a failed attempt is recorded on it (a flaky side is a finding) and run again."""
    failures: list[str] = []
    while True:
        try:
            measured = side.run()
        except Exception as exc:
            text = " ".join(f"{type(exc).__name__}: {exc}".split())
            # Keep both ends: the exception's type up front, the innermost frames and message at the end.
            message = text if len(text) <= 700 else f"{text[:200]} ... {text[-500:]}"
            failures.append(message)
            log(f"  FAILED {side.name} (attempt {len(failures)}): {message[:200]}")
            if len(failures) > retries:
                raise
            continue
        measured.failures = failures
        return measured


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import importlib.metadata

    cpu = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        total_kib = int(meminfo.read_text().split("MemTotal:", 1)[1].split()[0])
        memory_gib = round(total_kib / 2**20, 1)
    versions = {}
    for package in ("shap", "xgboost-cpu", "scikit-learn", "numpy", "pandas", "prefect", "mlflow", "boto3"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "thread_env": {
            k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
        },
        "versions": versions,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _met(record: dict[str, Any]) -> str:
    if record.get("target") is None:
        return "–"
    if record.get("met") is None:
        return "n/a"
    return "MET" if record["met"] else "MISSED"


def _target(record: dict[str, Any]) -> str:
    if record.get("target") is None:
        return "–"
    return f"{'≤' if record['target_is_max'] else '≥'} {record['target']:g}"


def render_markdown(report: dict[str, Any]) -> str:
    """The whole report as Markdown: the machine, a summary of targets, then one section per comparison."""
    info = report["machine"]
    lines = [
        "# shapline benchmarks",
        "",
        f"`{report['command']}` — {'quick' if report['quick'] else 'full'} run, {report['seconds']:.0f} s, {info['time']}.",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, {info['platform']}, "
        f"Python {info['python']}; load average at start {info['load_average']} "
        f"(at end {report.get('load_average_end')}). Versions: "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        + ".",
        "",
        "Every time is the median of the repetitions, the sides run in alternation in one process tree; "
        "a ratio is reported only after the sides' values were checked equal.",
        "",
        "## Targets",
        "",
        "| comparison | ratio | value | target | result | values equal |",
        "|---|---|---|---|---|---|",
    ]
    for comparison in report["comparisons"]:
        targeted = [r for r in comparison["ratios"] if r.get("target") is not None]
        if comparison["error"]:
            lines.append(f"| {comparison['name']} | – | – | – | ERROR | – |")
        for record in targeted:
            lines.append(
                f"| {comparison['name']} | {record['name']} | {_fmt(record['value'])} | {_target(record)} | "
                f"{_met(record)} | {_fmt(comparison['values_equal'])} |"
            )
    for comparison in report["comparisons"]:
        lines += ["", f"## {comparison['name']}: {comparison['title']}", ""]
        if comparison["error"]:
            lines += ["```", comparison["error"].strip(), "```", ""]
        lines.append("Workload: " + ", ".join(f"{k}={v}" for k, v in comparison["workload"].items()) + ".")
        lines += [
            "",
            "| side | median s | samples s | failed runs | other medians |",
            "|---|---|---|---|---|",
        ]
        failed: list[str] = []
        for name, side in comparison["sides"].items():
            others = ", ".join(f"{k} {_fmt(v['median'])}" for k, v in side["metrics"].items())
            samples = " ".join(f"{s:.2f}" for s in side["seconds"])
            lines.append(
                f"| {name} | {side['median_s']:.3f} | {samples} | {len(side['failed_attempts'])} | {others} |"
            )
            failed += [f"{name}: {message[:300]}" for message in side["failed_attempts"]]
        if comparison["ratios"]:
            lines += ["", "| ratio | value | target | result | note |", "|---|---|---|---|---|"]
            for record in comparison["ratios"]:
                lines.append(
                    f"| {record['name']} | {_fmt(record['value'])} | {_target(record)} | {_met(record)} | {record['note']} |"
                )
        if comparison["checks"]:
            lines += [
                "",
                "| values of | equal to | rtol | atol | max abs diff | passed |",
                "|---|---|---|---|---|---|",
            ]
            for check in comparison["checks"]:
                lines.append(
                    f"| {check['side']} | {check['reference']} | {check['rtol']:g} | {check['atol']:g} | "
                    f"{_fmt(check.get('max_abs_diff'))} | {_fmt(check['passed'])} |"
                )
        for table in comparison["tables"]:
            lines += ["", f"**{table['title']}**", "", "| " + " | ".join(table["columns"]) + " |"]
            lines.append("|" + "---|" * len(table["columns"]))
            for row in table["rows"]:
                lines.append("| " + " | ".join(_fmt(cell) for cell in row) + " |")
        if failed:
            lines += ["", "Failed runs (retried):", ""] + [f"- `{line}`" for line in failed]
        if comparison["notes"]:
            lines.append("")
            lines += [f"- {note}" for note in comparison["notes"]]
    return "\n".join(lines) + "\n"


def render_console(report: dict[str, Any]) -> str:
    """A compact table of medians and ratios for the terminal."""
    rows = [("comparison", "side / ratio", "median s / value", "target", "result")]
    for comparison in report["comparisons"]:
        if comparison["error"]:
            rows.append(
                (comparison["name"], "ERROR", comparison["error"].strip().splitlines()[-1][:60], "", "")
            )
        for name, side in comparison["sides"].items():
            rows.append((comparison["name"], name, f"{side['median_s']:.3f}", "", ""))
        for record in comparison["ratios"]:
            rows.append(
                (comparison["name"], record["name"], _fmt(record["value"]), _target(record), _met(record))
            )
        rows.append((comparison["name"], "values equal", _fmt(comparison["values_equal"]), "", ""))
    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows
    )


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write results.json and results.md into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path


@dataclass
class Context:
    """What every comparison gets: where to write, the cache of data and models, and how many repetitions."""

    work: Path
    cache: Path
    reps: int
    quick: bool
    log: Callable[[str], None]
    server_start_s: float = 0.0

    def folder(self, name: str) -> Path:
        """A fresh folder under the run's work directory."""
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path
