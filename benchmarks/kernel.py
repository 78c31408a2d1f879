"""Comparison 1: KernelExplainer on a local model, plain shap in one process against shapline's shards."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.child import run_child
from benchmarks.harness import ComparisonResult, Context, Measurement, Ratio, Side, alternate
from benchmarks.workloads import (
    KERNEL_TOLERANCE,
    breast_cancer,
    explain_sample,
    read_values,
    run_flow,
    values_matrix,
    write_config,
)

FULL = {"rows": 48, "nsamples": "auto", "background": 50, "l1_reg": "aic", "seed": 0, "shards": 8}
QUICK = {"rows": 4, "nsamples": 300, "background": 10, "l1_reg": "aic", "seed": 0, "shards": 2}

ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def flow_side(
    config: Any, row_ids: np.ndarray, features: list[str], overrides: list[str]
) -> Callable[[], Measurement]:
    """A side that runs the whole flow in this process: its wall time, its explain phase and its values."""

    def run() -> Measurement:
        flow = run_flow(config, overrides)
        assert flow.values is not None
        return Measurement(
            flow.seconds,
            values_matrix(flow.values, features, row_ids),
            {"explain_s": flow.summary["explain_s"], "flow_duration_s": flow.summary["duration_s"]},
        )

    return run


def child_flow_side(
    config: Any,
    row_ids: np.ndarray,
    features: list[str],
    overrides: list[str],
    env: dict[str, str],
    pin: int | None = None,
    poll_s: float = 0.02,
) -> Callable[[], Measurement]:
    """The flow in a fresh process started with `env` (thread settings must be set before numpy loads),
    the whole process on core `pin` when given; its memory polled every `poll_s` seconds."""

    def run() -> Measurement:
        job = {"kind": "flow", "config": str(config), "overrides": overrides}
        child = run_child(job, env=env, pin=pin, poll_s=poll_s)
        values = values_matrix(read_values(child["summary"]), features, row_ids)
        summary = child["summary"]
        # Kernel runs: the model's own seconds in the phase, wall and its threads' CPU (summed over workers).
        model = {key: summary[key] for key in ("model_s", "model_cpu_s") if summary.get(key) is not None}
        return Measurement(
            child["seconds"],
            values,
            {"explain_s": child["explain_s"], "flow_duration_s": summary["duration_s"], **model},
        )

    return run


def kernel_config(
    folder: Any,
    name: str,
    model: dict[str, Any],
    data_path: Any,
    rows: int,
    params: dict[str, Any],
    shard_size: int,
) -> Any:
    """The flow's config for a kernel comparison: random background, logit, the comparison's knobs."""
    return write_config(
        folder,
        name,
        model=model,
        data={"source": str(data_path), "target": "target", "explain_rows": rows, "seed": params["seed"]},
        background={"method": "random", "size": params["background"], "seed": params["seed"]},
        explainer={
            "algorithm": "kernel",
            "link": "logit",
            "nsamples": params["nsamples"],
            "l1_reg": params["l1_reg"],
            "seed": params["seed"],
        },
        shards={"size": shard_size},
    )


def run(context: Context, params: dict[str, Any]) -> ComparisonResult:
    """Plain shap.KernelExplainer vs shapline with 1 and 2 thread and process workers, same values."""
    dataset = breast_cancer(context.cache)
    frame = dataset.frame()[dataset.features]
    rows = explain_sample(frame, params["rows"], params["seed"])
    shard_size = max(1, math.ceil(len(rows) / params["shards"]))
    result = ComparisonResult(
        name="kernel",
        title="KernelExplainer, local XGBoost model: plain shap vs shapline shards",
        workload={
            "data": f"breast_cancer {len(frame)}x{len(dataset.features)}",
            "model": "XGBClassifier(100 trees, depth 4, default n_jobs)",
            "rows": len(rows),
            "background": params["background"],
            "nsamples": params["nsamples"],
            "l1_reg": params["l1_reg"],
            "link": "logit",
            "shard_size": shard_size,
        },
    )
    config = kernel_config(
        context.folder("kernel"),
        "kernel",
        {"name": "bench-kernel", "kind": "xgboost", "path": str(dataset.model_path)},
        dataset.data_path,
        len(rows),
        params,
        shard_size,
    )
    row_ids = rows.index.to_numpy()

    def plain_child(name: str, env: dict[str, str]) -> Callable[[], Measurement]:
        # A fresh process, as a notebook kernel is: the flow runs in this process and may leave its thread
        # limits behind (threadpoolctl is process-wide for BLAS), which would change the plain side's speed.
        values_path = context.folder("kernel") / f"{name}.npy"
        job = {
            "kind": "kernel-plain",
            "data_path": str(dataset.data_path),
            "model_path": str(dataset.model_path),
            "features": dataset.features,
            "values_path": str(values_path),
            **{key: params[key] for key in ("rows", "seed", "background", "nsamples", "l1_reg")},
        }

        def run_side() -> Measurement:
            child = run_child(job, env=env)
            return Measurement(child["seconds"], np.load(values_path), {"explain_s": child["seconds"]})

        return run_side

    def shapline(runner: str, workers: int, env: dict[str, str] | None = None) -> Callable[[], Measurement]:
        overrides = [f"shards.runner={runner}", f"shards.workers={workers}"]
        if env:
            return child_flow_side(config, row_ids, dataset.features, overrides, env)
        return flow_side(config, row_ids, dataset.features, overrides)

    sides = [
        Side(
            "plain shap",
            plain_child("plain", {}),
            "shap.KernelExplainer in a fresh process, a loop over rows, default threads (compute time only)",
        ),
        Side("shapline thread x1", shapline("thread", 1), "the flow, thread runner, 1 worker"),
        Side("shapline thread x2", shapline("thread", 2), "the flow, thread runner, 2 workers"),
        Side("shapline process x1", shapline("process", 1), "the flow, process runner, 1 worker"),
        Side("shapline process x2", shapline("process", 2), "the flow, process runner, 2 workers"),
        Side(
            "plain shap, 1 thread",
            plain_child("plain-one-thread", ONE_THREAD),
            "plain shap in a child process with OMP/OpenBLAS at 1 thread (compute time only)",
        ),
        Side(
            "shapline thread x2, 1 native thread",
            shapline("thread", 2, ONE_THREAD),
            "thread runner x2 in a process started with OMP/OpenBLAS at 1 thread",
        ),
        Side(
            "shapline process x2, 1 native thread",
            shapline("process", 2, ONE_THREAD),
            "process runner x2, workers started with OMP/OpenBLAS at 1 thread",
        ),
    ]
    if context.quick:
        # The quick run only proves the harness works; the process runner is just another --set.
        sides = [s for s in sides if s.name in ("plain shap", "shapline thread x2")]
    result.descriptions = {s.name: s.description for s in sides}
    result.sides = alternate(sides, context.reps, False, context.log)
    for side in sides[1:]:
        result.check("plain shap", side.name, KERNEL_TOLERANCE)
    target = (
        "explain phase (explain_s: the sharded SHAP phase, incl. task start-up, from the workers being ready)"
    )
    result.ratio(
        Ratio(
            "plain / thread x2, explain phase",
            "plain shap",
            "shapline thread x2",
            "explain_s",
            1.8,
            note=target,
        )
    )
    result.ratio(
        Ratio("plain / thread x2, whole flow", "plain shap", "shapline thread x2", note="flow wall time")
    )
    if context.quick:
        return result
    result.ratio(
        Ratio(
            "plain / process x2, explain phase",
            "plain shap",
            "shapline process x2",
            "explain_s",
            1.8,
            note=target,
        )
    )
    result.ratio(
        Ratio("plain / process x2, whole flow", "plain shap", "shapline process x2", note="flow wall time")
    )
    result.ratio(
        Ratio("thread x1 / x2, explain phase", "shapline thread x1", "shapline thread x2", "explain_s")
    )
    result.ratio(
        Ratio("process x1 / x2, explain phase", "shapline process x1", "shapline process x2", "explain_s")
    )
    result.ratio(Ratio("plain / thread x1, explain phase", "plain shap", "shapline thread x1", "explain_s"))
    for runner in ("thread", "process"):
        fixed = f"shapline {runner} x2, 1 native thread"
        result.ratio(
            Ratio(
                f"plain / {runner} x2 OMP=1, explain",
                "plain shap",
                fixed,
                "explain_s",
                note="flow process started with OMP/OpenBLAS at 1 thread",
            )
        )
        result.ratio(
            Ratio(
                f"plain 1-thread / {runner} x2 1-thread, explain",
                "plain shap, 1 thread",
                fixed,
                "explain_s",
                note="like for like",
            )
        )
    result.notes.append(
        "Values: shapline seeds numpy's global RNG per row (row_seed(seed, row_id)); the plain side reproduces "
        "that by calling np.random.seed(row_seed(seed, row_id)) before each row's shap_values, otherwise it is "
        "plain shap.KernelExplainer(f, background, link='logit') with the same nsamples and l1_reg. "
        "Full enumeration is impossible at 30 features (2^30 coalitions)."
    )
    return result
