"""`shapline compare RUN_A RUN_B`: the drift comparison of any two runs, without running anything; and
`shapline reference RUN_ID`: pin the run a model's later runs compare with (monitor.baseline: reference)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from shapline.tasks.common.schemas import CLASS
from shapline.tasks.monitoring.drift import same_rows
from shapline.tasks.monitoring.history import load_comparison, pin_reference
from shapline.tasks.tracking.uris import resolve_tracking_uri


def add_parser(commands: Any) -> argparse.ArgumentParser:
    compare = commands.add_parser(
        "compare", help="compare two runs' explanations (RUN_B against RUN_A as its baseline)"
    )
    compare.add_argument("run_a", metavar="RUN_A", help="the baseline run's id (or its first characters)")
    compare.add_argument("run_b", metavar="RUN_B", help="the run compared with it (or its first characters)")
    _store_and_json(compare)
    return compare


def _store_and_json(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--tracking-uri",
        default=None,
        help="the MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db; never created)",
    )
    command.add_argument("--json", action="store_true", help="end stdout with one JSON object")


def add_reference_parser(commands: Any) -> argparse.ArgumentParser:
    reference = commands.add_parser(
        "reference",
        help="pin a run as its model's reference: runs with monitor.baseline reference compare with it",
    )
    reference.add_argument(
        "run",
        metavar="RUN_ID",
        help="the run to pin (its id, or its first characters), e.g. one on the training data",
    )
    _store_and_json(reference)
    return reference


def reference(run: str, tracking_uri: str | None) -> tuple[list[str], dict[str, Any]]:
    """Pin the run as its model's reference; the lines a person reads and the --json object."""
    uri = resolve_tracking_uri(tracking_uri)
    pinned, model, replaced = pin_reference(uri, run)
    lines = [
        f"run {pinned.run_id} ({pinned.run_name}) is the reference of {model} now: it explained "
        f"{pinned.explained()}",
        "runs of the model with monitor.baseline: reference compare with it"
        + (f" (it replaces run {', '.join(replaced)})" if replaced else ""),
    ]
    lines.append(f"open it at: {pinned.url}" + (f" (after {pinned.open_hint})" if pinned.open_hint else ""))
    result = {"status": "PINNED", "reference_run_id": pinned.run_id, "model": model, "replaced": replaced}
    return lines, result


def compare(run_a: str, run_b: str, tracking_uri: str | None) -> tuple[list[str], dict[str, Any]]:
    """The lines a person reads and the --json object."""
    uri = resolve_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="shapline-compare-") as folder:
        comparison, (_, path_a), (b, path_b) = load_comparison(uri, run_a, run_b, Path(folder))
        rows = same_rows(path_a, path_b)
    run_a, run_b = comparison.baseline_run_id, b.info.run_id  # the whole ids, whatever was typed
    lines = [f"run {run_b} against run {run_a} (baseline) in {uri}"]
    lines.append(comparison.sentence())
    for label, value in comparison.ndcg_by_class.items():
        lines.append(f"  class {label}: NDCG {value:.3f}")
    lines.append(f"top movers: {comparison.movers_text(5)}")
    table = comparison.table.head(10)
    lines.append("feature: baseline_mean_abs -> mean_abs (change), rank baseline -> now, wasserstein")
    for record in table.to_dict(orient="records"):  # not itertuples: it renames the `class` column
        named = f"{record['feature']} [{record[CLASS]}]" if CLASS in record else str(record["feature"])
        lines.append(
            f"  {named}: {record['baseline_mean_abs']:.4g} -> {record['mean_abs']:.4g} "
            f"({record['change']:+.4g}), rank {record['baseline_rank']} -> {record['rank']}, "
            f"{record['wasserstein']:.4g}"
        )
    result: dict[str, Any] = {**comparison.to_json(), "run_a": run_a, "run_b": run_b, "tracking_uri": uri}
    result["features"] = json.loads(comparison.table.to_json(orient="records"))
    if rows is None:
        lines.append("same rows: not compared (both runs need data.id_column)")
        result["same_rows"] = None
    else:
        lines.append(
            f"same rows (by {rows.id_column}): {rows.rows_in_both} in both, {rows.rows_only_a} only in "
            f"{run_a}, {rows.rows_only_b} only in {run_b}"
        )
        for row in rows.per_feature.head(5).itertuples():
            lines.append(
                f"  {row.feature}: mean |change| {row.mean_abs_diff:.4g}, largest {row.max_abs_diff:.4g}"
            )
        moved = ", ".join(
            f"{r[rows.id_column]} ({r['total_abs_diff']:.3g}, most in {r['most_moved_feature']})"
            for r in rows.moved_rows.to_dict(orient="records")
        )
        lines.append(
            f"  rows that moved most: {moved}" if moved else "  no row moved: every row's values are the same"
        )
        result["same_rows"] = json.loads(json.dumps(rows.to_json(), default=str))
    return lines, result
