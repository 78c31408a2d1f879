"""Comparison 4: tree SHAP at scale, shapline's flow vs shap.TreeExplainer and xgboost pred_contribs, time and peak RSS."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.child import run_child
from benchmarks.harness import ComparisonResult, Context, Measurement, Side, alternate
from benchmarks.workloads import TREE_TOLERANCE, read_values, synthetic, write_config

FULL = {"rows": 1_000_000, "features": 30, "shard_size": 125_000, "workers": 2, "runner": "thread", "reps": 2}
QUICK = {"rows": 5_000, "features": 30, "shard_size": 2_500, "workers": 2, "runner": "thread", "reps": 1}

MB = 1e6


def run(context: Context, params: dict[str, Any]) -> ComparisonResult:
    """Each side in its own process (peak RSS of its process tree), alternated, values compared with shap's."""
    dataset = synthetic(context.cache, params["rows"], params["features"])
    folder = context.folder("tree")
    rows, features = params["rows"], params["features"]
    matrix_bytes = rows * features * 8
    config = write_config(
        folder,
        "tree",
        model={"name": "bench-tree", "kind": "xgboost", "path": str(dataset.model_path)},
        data={"source": str(dataset.data_path), "target": "target"},
        explainer={"algorithm": "tree"},
        shards={"size": params["shard_size"], "runner": params["runner"], "workers": params["workers"]},
    )
    result = ComparisonResult(
        name="tree",
        title="TreeExplainer at scale: shapline flow vs shap.TreeExplainer vs xgboost pred_contribs",
        workload={
            "data": f"make_classification {rows}x{features} float64 parquet",
            "model": "XGBClassifier(50 trees, depth 4, hist, default n_jobs), trained on the first 100k rows",
            "shapline": f"{params['runner']} x{params['workers']}, shard size {params['shard_size']}, default plots",
            "values_plus_data_mb": round(2 * matrix_bytes / MB, 1),
        },
    )

    def direct(method: str) -> Callable[[], Measurement]:
        values_path = folder / f"values-{method}.npy"
        first = [True]

        def run_side() -> Measurement:
            job = {
                "kind": "tree-direct",
                "method": method,
                "data_path": str(dataset.data_path),
                "model_path": str(dataset.model_path),
                "features": dataset.features,
                "values_path": str(values_path),
            }
            child = run_child(job)
            values = np.load(values_path) if first[0] else None
            first[0] = False
            return Measurement(child["seconds"], values, _memory(child, child["seconds"], rows))

        return run_side

    flow_first = [True]

    def flow() -> Measurement:
        child = run_child({"kind": "flow", "config": str(config)})
        values = None
        if flow_first[0]:
            frame = read_values(child["summary"])
            values = frame.loc[np.arange(rows), dataset.features].to_numpy(dtype=float)
            flow_first[0] = False
        measured = Measurement(child["seconds"], values, _memory(child, child["seconds"], rows))
        measured.extra["explain_s"] = child["explain_s"]
        return measured

    sides = [
        Side(
            "shap.TreeExplainer", direct("shap"), "read the parquet, shap.TreeExplainer(model).shap_values(X)"
        ),
        Side(
            "xgboost pred_contribs",
            direct("contribs"),
            "read the parquet, booster.predict(DMatrix(X), pred_contribs=True)",
        ),
        Side("shapline flow", flow, "shapline run in a child process, the Prefect server outside it"),
    ]
    if context.quick:
        # One direct side proves the child-process path; shap.TreeExplainer only in a full run.
        sides = sides[1:]
    result.descriptions = {s.name: s.description for s in sides}
    result.sides = alternate(sides, min(context.reps, params["reps"]), False, context.log)
    for side in sides[1:]:
        result.check(sides[0].name, side.name, TREE_TOLERANCE)
    for samples in result.sides.values():
        for measured in samples:
            measured.values = None
    faster = min((name for name in result.sides if name != "shapline flow"), key=result.median)
    best = result.median(faster)
    result.record_ratio(
        "throughput: flow explain phase / faster direct",
        best / result.median("shapline flow", "explain_s"),
        0.9,
        note=f"faster: {faster}; explain_s: the rows read back from staging, SHAP, the shards written",
    )
    result.record_ratio(
        "throughput: flow / faster direct",
        best / result.median("shapline flow"),
        0.8,
        note="whole flow: also validation, the values table, plots, MLflow and drift against the baseline",
    )
    budget = 2 * matrix_bytes
    for name in result.sides:
        result.record_ratio(
            f"peak RSS above imports / (values + data): {name}",
            result.median(name, "peak_above_baseline_mb") * MB / budget,
            1.2 if name == "shapline flow" else None,
            True,
            "minus the RSS after imports and model load",
        )
        result.record_ratio(
            f"peak RSS / (values + data): {name}",
            result.median(name, "tree_peak_rss_mb") * MB / budget,
            None,
            True,
            "whole process tree incl. interpreter and imports (shapline's are ~490 MB: Prefect, MLflow, GX)",
        )
    result.notes.append(
        f"values + data = 2 x {rows} x {features} x 8 bytes = {budget / MB:.0f} MB. Peak RSS is the sum over the "
        "child's process tree, polled every 20 ms; the Prefect server is a separate process and not counted."
    )
    return result


def _memory(child: dict[str, Any], compute_s: float, rows: int) -> dict[str, float]:
    return {
        "tree_peak_rss_mb": child["tree_peak_rss_bytes"] / MB,
        "self_maxrss_mb": child["self_maxrss_bytes"] / MB,
        "baseline_rss_mb": child["baseline_rss_bytes"] / MB,
        "peak_above_baseline_mb": (child["tree_peak_rss_bytes"] - child["baseline_rss_bytes"]) / MB,
        "rows_per_s": rows / compute_s if compute_s else 0.0,
        "process_wall_s": child["process_wall_s"],
    }
