"""Comparison: Kernel SHAP per core, like for like. Every side runs in a fresh process with OpenMP and
BLAS at one thread: plain shap.KernelExplainer, shapline with one worker, shapline with two process
workers; and the model's own time on plain shap's calls, which is the limit (a kernel explainer cannot
be faster than the model it calls). Two workloads: the breast-cancer XGBoost model (30 numeric
features) and the demo's penguins Pipeline (text, numbers, missing values)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.child import run_child
from benchmarks.harness import ComparisonResult, Context, Measurement, Ratio, Side, alternate
from benchmarks.kernel import ONE_THREAD, child_flow_side, kernel_config
from benchmarks.workloads import KERNEL_TOLERANCE, breast_cancer, explain_sample, penguins

FULL = {"rows": 32, "nsamples": "auto", "background": 50, "l1_reg": "aic", "seed": 0, "shards": 4}
QUICK = {"rows": 4, "nsamples": 300, "background": 10, "l1_reg": "aic", "seed": 0, "shards": 2}
WORKLOADS = {
    "cancer": ("breast_cancer 569x30, XGBClassifier(100 trees, depth 4)", 1),
    "penguins": ("penguins 344x7 (text, numbers, NaN), Pipeline(impute, one-hot, logistic)", 1),
}


def _workload(context: Context, name: str) -> Any:
    return breast_cancer(context.cache) if name == "cancer" else penguins(context.cache)


def run(context: Context, params: dict[str, Any]) -> ComparisonResult:
    result = ComparisonResult(
        name="percore",
        title="Kernel SHAP per core (everything at one native thread): plain shap vs shapline, and the limit",
        workload={
            "rows": params["rows"],
            "background": params["background"],
            "nsamples": params["nsamples"],
            "l1_reg": params["l1_reg"],
            "link": "logit",
            "threads": "OMP/OpenBLAS/MKL = 1 on every side",
        },
    )
    sides: list[Side] = []
    for name, (said, class_index) in WORKLOADS.items():
        dataset = _workload(context, name)
        frame = dataset.frame()[dataset.features]
        rows = explain_sample(frame, params["rows"], params["seed"])
        row_ids = rows.index.to_numpy()
        folder = context.folder(f"percore-{name}")
        shard_size = max(1, math.ceil(len(rows) / params["shards"]))
        kind = "xgboost" if name == "cancer" else "sklearn"
        config = kernel_config(
            folder,
            name,
            {
                "name": f"bench-percore-{name}",
                "kind": kind,
                "path": str(dataset.model_path),
                "class_index": class_index,
            },
            dataset.data_path,
            len(rows),
            params,
            shard_size,
        )
        job = {
            "data_path": str(dataset.data_path),
            "model_path": str(dataset.model_path),
            "features": dataset.features,
            "class_index": class_index,
            **{key: params[key] for key in ("rows", "seed", "background", "nsamples", "l1_reg")},
        }

        def plain(job: dict[str, Any] = job, folder: Any = folder) -> Callable[[], Measurement]:
            values_path = folder / "plain.npy"

            def side() -> Measurement:
                child = run_child(
                    {**job, "kind": "kernel-plain", "values_path": str(values_path)}, env=ONE_THREAD
                )
                return Measurement(child["seconds"], np.load(values_path), {"explain_s": child["seconds"]})

            return side

        def model_time(job: dict[str, Any] = job) -> Callable[[], Measurement]:
            def side() -> Measurement:
                child = run_child({**job, "kind": "kernel-model-time"}, env=ONE_THREAD)
                return Measurement(child["seconds"], None, {"explain_s": child["seconds"]})

            return side

        def shapline(
            runner: str,
            workers: int,
            config: Any = config,
            row_ids: Any = row_ids,
            features: list[str] = dataset.features,
        ) -> Callable[[], Measurement]:
            overrides = [f"shards.runner={runner}", f"shards.workers={workers}"]
            return child_flow_side(config, row_ids, features, overrides, ONE_THREAD)

        sides += [
            Side(f"{name}: plain shap", plain(), f"{said}: shap.KernelExplainer, a loop over rows, 1 thread"),
            Side(
                f"{name}: model only",
                model_time(),
                f"{said}: the model's time on plain shap's calls (the limit)",
            ),
            Side(
                f"{name}: shapline thread x1", shapline("thread", 1), f"{said}: the flow, 1 worker, 1 thread"
            ),
            Side(
                f"{name}: shapline process x2",
                shapline("process", 2),
                f"{said}: the flow, 2 process workers, 1 thread each",
            ),
        ]
    if context.quick:
        # Proof that the harness works: one workload, no process pool.
        sides = [s for s in sides if s.name.startswith("cancer") and "process" not in s.name]
    result.descriptions = {s.name: s.description for s in sides}
    result.sides = alternate(sides, context.reps, False, context.log)
    for name in WORKLOADS:
        if context.quick and name != "cancer":
            continue
        for side in ("shapline thread x1", "shapline process x2"):
            if not (context.quick and "process" in side):
                result.check(f"{name}: plain shap", f"{name}: {side}", KERNEL_TOLERANCE)
        result.ratio(
            Ratio(
                f"{name}: limit (plain / model only)",
                f"{name}: plain shap",
                f"{name}: model only",
                "explain_s",
                note="how much faster than plain shap a kernel explainer could be on one core",
            )
        )
        result.ratio(
            Ratio(
                f"{name}: plain / shapline x1, per core",
                f"{name}: plain shap",
                f"{name}: shapline thread x1",
                "explain_s",
                2.0 if name == "cancer" else None,
                note="explain phase; both at one native thread",
            )
        )
        result.ratio(
            Ratio(
                f"{name}: share of the limit, per core",
                f"{name}: model only",
                f"{name}: shapline thread x1",
                "explain_s",
                0.8,
                note="(plain / shapline x1) / (plain / model only): 1 is as fast as the model allows",
            )
        )
        if not context.quick:
            result.ratio(
                Ratio(
                    f"{name}: plain / shapline process x2, two cores",
                    f"{name}: plain shap",
                    f"{name}: shapline process x2",
                    "explain_s",
                    3.6 if name == "cancer" else None,
                    note="plain shap at one thread on one core; shapline on two",
                )
            )
    result.notes.append(
        "Limit: the model's own seconds on the calls plain shap makes (f(x) and the nsamples x background "
        "synthetic rows per explained row, as numpy arrays, one native thread). shapline at x1 is within "
        "(plain / shapline x1) / (plain / model only) of that limit."
    )
    return result
