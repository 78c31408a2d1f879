"""Comparison 5: the flow's wall time as the rows grow, kernel and tree; a fixed cost plus a cost per row."""

from __future__ import annotations

import time
from typing import Any

import joblib
import numpy as np

from benchmarks.harness import ComparisonResult, Context, Measurement, Side, Tolerance, alternate
from benchmarks.workloads import (
    KERNEL_TOLERANCE,
    TREE_TOLERANCE,
    explain_sample,
    per_row_kernel_values,
    random_background,
    run_flow,
    sliced,
    synthetic,
    values_matrix,
    write_config,
)

FULL = {
    "kernel_rows": [10, 100, 1000, 10000],
    "kernel_nsamples": 64,
    "kernel_l1_reg": False,
    "kernel_background": 10,
    "tree_rows": [1000, 10000, 100000, 1000000],
    "reference_max_rows": 100_000,
    "tree_shard_size": 125_000,
    "workers": 2,
    "reps": 2,
    "single_rep_from": 10000,
}
QUICK = {
    "kernel_rows": [5, 10],
    "kernel_nsamples": 64,
    "kernel_l1_reg": False,
    "kernel_background": 10,
    "tree_rows": [500, 1000],
    "reference_max_rows": 100_000,
    "tree_shard_size": 1000,
    "workers": 2,
    "reps": 1,
    "single_rep_from": 10000,
}


def fit_line(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least squares t = fixed + per_row * n, weighted by 1/t so small and large sizes count alike."""
    n, t = np.asarray(sizes, dtype=float), np.asarray(seconds, dtype=float)
    weights = 1.0 / t
    design = np.column_stack([np.ones_like(n), n]) * weights[:, None]
    (fixed, per_row), *_ = np.linalg.lstsq(design, t * weights, rcond=None)
    return float(fixed), float(per_row)


def curve_table(name: str, sizes: list[int], seconds: list[float], explain: list[float]) -> dict[str, Any]:
    """Per size: wall, explain phase, per-row cost, marginal cost from the previous size, and the line fit's error."""
    fixed, per_row = fit_line(sizes, seconds)
    rows = []
    for i, (n, t, e) in enumerate(zip(sizes, seconds, explain, strict=True)):
        marginal = (t - seconds[i - 1]) / (n - sizes[i - 1]) * 1e3 if i else None
        predicted = fixed + per_row * n
        rows.append([n, t, e, t / n * 1e3, e / n * 1e3, marginal, (t - predicted) / predicted * 100])
    return {
        "title": f"{name}: fit t = {fixed:.2f} s + {per_row * 1e3:.4g} ms x rows",
        "columns": [
            "rows",
            "wall s",
            "explain s",
            "wall ms/row",
            "explain ms/row",
            "marginal ms/row",
            "fit error %",
        ],
        "rows": rows,
        "fixed_s": fixed,
        "per_row_ms": per_row * 1e3,
    }


def run(context: Context, params: dict[str, Any]) -> ComparisonResult:
    """Flow runs at growing sizes; each size's values checked against plain shap or xgboost on the same rows."""
    largest = max(max(params["kernel_rows"]), max(params["tree_rows"]))
    dataset = synthetic(context.cache, largest)
    folder = context.folder("scaling")
    model = joblib.load(dataset.model_path)
    workers = params["workers"]
    result = ComparisonResult(
        name="scaling",
        title="scaling curve: flow wall time as rows grow (kernel and tree)",
        workload={
            "data": f"make_classification, first N of {largest} rows x 30",
            "kernel": f"nsamples={params['kernel_nsamples']} l1_reg={params['kernel_l1_reg']} "
            f"background={params['kernel_background']}, shard size 100",
            "tree": f"shard size {params['tree_shard_size']}",
            "runner": f"thread x{workers}",
        },
    )
    sides: list[Side] = []
    references: list[tuple[str, str, Tolerance]] = []

    for n in params["kernel_rows"]:
        data = sliced(dataset, n)
        config = write_config(
            folder,
            f"kernel-{n}",
            model={"name": "bench-scaling-kernel", "kind": "xgboost", "path": str(data.model_path)},
            data={"source": str(data.data_path), "target": "target"},
            background={"method": "random", "size": params["kernel_background"], "seed": 0},
            explainer={
                "algorithm": "kernel",
                "link": "logit",
                "nsamples": params["kernel_nsamples"],
                "l1_reg": params["kernel_l1_reg"],
                "seed": 0,
            },
            shards={"size": 100, "runner": "thread", "workers": workers},
            output={"plots": ["bar", "beeswarm"]},
        )
        sides.append(Side(f"kernel {n}", _flow_side(config, data.features, n, params), f"flow, {n} rows"))
        if n == min(params["kernel_rows"]):
            frame = data.frame()[data.features]
            background = random_background(frame, params["kernel_background"], 0).to_numpy()

            def plain(frame: Any = frame, background: np.ndarray = background) -> Measurement:
                started = time.perf_counter()
                values = per_row_kernel_values(
                    lambda x: model.predict_proba(x)[:, 1],
                    background,
                    explain_sample(frame, "all", 0),
                    params["kernel_nsamples"],
                    params["kernel_l1_reg"],
                    0,
                )
                return Measurement(
                    time.perf_counter() - started, values, {"explain_s": time.perf_counter() - started}
                )

            sides.append(Side(f"plain kernel {n}", plain, "plain shap, per-row seeds: the values reference"))
            references.append((f"plain kernel {n}", f"kernel {n}", KERNEL_TOLERANCE))

    for n in params["tree_rows"]:
        data = sliced(dataset, n)
        config = write_config(
            folder,
            f"tree-{n}",
            model={"name": "bench-scaling-tree", "kind": "xgboost", "path": str(data.model_path)},
            data={"source": str(data.data_path), "target": "target"},
            explainer={"algorithm": "tree"},
            shards={"size": params["tree_shard_size"], "runner": "thread", "workers": workers},
            output={"plots": ["bar", "beeswarm"]},
        )
        sides.append(Side(f"tree {n}", _flow_side(config, data.features, n, params), f"flow, {n} rows"))
        if n > params["reference_max_rows"]:
            continue  # comparison "tree" checks this size against shap and xgboost

        def contribs(path: Any = data.data_path, features: list[str] = data.features) -> Measurement:
            import pandas as pd
            import xgboost

            started = time.perf_counter()
            frame = pd.read_parquet(path, columns=features)
            values = model.get_booster().predict(xgboost.DMatrix(frame), pred_contribs=True)[:, :-1]
            return Measurement(
                time.perf_counter() - started,
                np.asarray(values, dtype=float),
                {"explain_s": time.perf_counter() - started},
            )

        sides.append(
            Side(
                f"pred_contribs {n}", contribs, "xgboost pred_contribs on the same rows: the values reference"
            )
        )
        references.append((f"pred_contribs {n}", f"tree {n}", TREE_TOLERANCE))

    result.descriptions = {s.name: s.description for s in sides}
    # Small sizes are cheap and noisy: repeat them; the largest run once (they dominate the total time).
    repeated = [s for s in sides if _size(s.name) < params["single_rep_from"]]
    single = [s for s in sides if _size(s.name) >= params["single_rep_from"]]
    result.sides = alternate(repeated, params["reps"] if not context.quick else 1, False, context.log)
    result.sides.update(alternate(single, 1, False, context.log))
    for reference, side, tolerance in references:
        result.check(reference, side, tolerance)
    for samples in result.sides.values():
        for measured in samples:
            measured.values = None
    for kind, sizes in (("kernel", params["kernel_rows"]), ("tree", params["tree_rows"])):
        if len(sizes) < 2:
            continue
        seconds = [result.median(f"{kind} {n}") for n in sizes]
        explain = [result.median(f"{kind} {n}", "explain_s") for n in sizes]
        table = curve_table(f"{kind} (flow)", sizes, seconds, explain)
        result.tables.append(table)
        result.record_ratio(
            f"{kind}: fixed cost s (fit)", table["fixed_s"], note="intercept of the weighted line fit"
        )
        result.record_ratio(
            f"{kind}: cost per row ms (fit)", table["per_row_ms"], note="slope of the weighted line fit"
        )
    tree_direct = [
        [n, result.median(f"pred_contribs {n}"), result.median(f"pred_contribs {n}") / n * 1e3]
        for n in params["tree_rows"]
        if f"pred_contribs {n}" in result.sides
    ]
    result.tables.append(
        {
            "title": "tree reference: pred_contribs alone",
            "columns": ["rows", "seconds", "ms/row"],
            "rows": tree_direct,
        }
    )
    return result


def _size(name: str) -> int:
    return int(name.rsplit(" ", 1)[1])


def _flow_side(config: Any, features: list[str], n: int, params: dict[str, Any]) -> Any:
    def run_side() -> Measurement:
        flow = run_flow(config)
        assert flow.values is not None
        return Measurement(
            flow.seconds,
            values_matrix(flow.values, features, np.arange(n)),
            {"explain_s": flow.summary["explain_s"], "shards": flow.metrics["shards"]},
        )

    return run_side
