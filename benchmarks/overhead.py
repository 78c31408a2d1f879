"""Comparison 2: what the flow costs around the SHAP compute, and the fixed cost of a tiny run."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.harness import ComparisonResult, Context, Measurement, Ratio, Side, alternate
from benchmarks.workloads import (
    KERNEL_TOLERANCE,
    breast_cancer,
    explain_sample,
    fresh_cache_overrides,
    random_background,
    run_flow,
    synthetic,
    values_matrix,
    write_config,
)

# rows "auto": as many rows as make the direct compute last target_s, measured on calibration_rows first
# (one shard per worker; the machine's speed varies by more than 2x; the workload must last a minute or more).
FULL = {
    "rows": "auto",
    "target_s": 100,
    "calibration_rows": 100,
    "data_rows": 20_000,
    "workers": 2,
    "shard_size": 50,
    "nsamples": "auto",
    "background": 50,
    "reps": 2,
    "tiny_reps": 3,
    "cold_reps": 2,
}
QUICK = {
    "rows": 4,
    "target_s": 0,
    "calibration_rows": 0,
    "data_rows": 1000,
    "workers": 2,
    "shard_size": 2,
    "nsamples": 200,
    "background": 10,
    "reps": 1,
    "tiny_reps": 0,
    "cold_reps": 0,
}

CLI = "import sys; from shapline.flows.cli import main; sys.exit(main())"


def direct_compute(config_path: Path, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """The flow's SHAP compute without the flow: shapline's explain_rows on the same shards, same thread count."""
    from threadpoolctl import threadpool_limits

    from shapline.tasks.common.config import load_config
    from shapline.tasks.common.cores import threads_per_worker
    from shapline.tasks.compute.shards import plan_shards
    from shapline.tasks.data.background import Background
    from shapline.tasks.explainers.explain import explain_rows
    from shapline.tasks.models.loading import load_predictor

    config = load_config(config_path)
    frame = pd.read_parquet(config.data.source).reset_index(drop=True)
    predictor = load_predictor(config.model)
    # The same thread caps as the flow's shards (where the project sets them), applied once, before any
    # thread shares the model.
    threads = threads_per_worker("thread", workers)
    if threads is not None:
        predictor.limit_threads(threads)
    features = predictor.feature_names or [c for c in frame.columns if c != config.data.target]
    frame = frame[features]
    rows = explain_sample(frame, config.data.explain_rows, config.data.seed)
    background = Background(frame=random_background(frame, config.background.size, config.background.seed))
    shards = plan_shards(rows.index, config.shards.size)

    def explain(shard: Any) -> np.ndarray:
        part = rows.loc[list(shard.row_ids)]
        return explain_rows(
            part, background, predictor, config.explainer, config.link, config.model.class_index
        ).values

    with threadpool_limits(limits=threads), ThreadPoolExecutor(max_workers=workers) as pool:
        values = list(pool.map(explain, shards))
    return rows.index.to_numpy(), np.concatenate(values)[:, :, 0]


def flow_phases(flow_run_id: str, shards: int) -> list[tuple[str, float]]:
    """Each task run of a flow run (and its subflow) with its run time, from the Prefect API, once its `shards`
    explain-shard runs and every other run are there in a final state (the server records them in batches
    flushed every 5 s)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)]))
            )
            shard_runs = [run for run in runs if run.name.startswith("explain-shard-")]
            final = all(run.state is not None and run.state.is_final() for run in runs)
            if (final and len(shard_runs) == shards) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    phases: dict[str, float] = defaultdict(float)
    for run in runs:
        seconds = run.total_run_time.total_seconds() if run.total_run_time else 0.0
        if not seconds and run.start_time and run.end_time:
            seconds = (run.end_time - run.start_time).total_seconds()
        phases[re.sub(r"-([0-9a-f]{3}|\d+)$", "", run.name)] += seconds
    return sorted(phases.items(), key=lambda item: -item[1])


def _flow_run_id(summary: dict[str, Any]) -> str:
    from mlflow.tracking import MlflowClient

    return (
        MlflowClient(summary["tracking_uri"])
        .get_run(summary["mlflow_run_id"])
        .data.tags["prefect.flow_run_id"]
    )


def cold_run(config: Path, with_server: bool) -> float:
    """Wall seconds of `shapline run` in a fresh interpreter: on the shared server, or starting its own."""
    env = dict(os.environ)
    if not with_server:
        env.pop("PREFECT_API_URL", None)
    argv = [sys.executable, "-c", CLI, "run", str(config), "--json"]
    for item in fresh_cache_overrides(config.parent):
        argv += ["--set", item]
    started = time.perf_counter()
    done = subprocess.run(
        argv, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0 or json.loads(done.stdout.strip().splitlines()[-1])["status"] != "FINISHED":
        raise RuntimeError(f"cold shapline run failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def import_times(config: Path) -> tuple[float, list[tuple[str, float, float]]]:
    """`python -X importtime` over a whole tiny run: total import seconds and, per top-level package, self and first-import seconds."""
    argv = [sys.executable, "-X", "importtime", "-c", CLI, "run", str(config), "--json"]
    for item in fresh_cache_overrides(config.parent):
        argv += ["--set", item]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    own: dict[str, float] = defaultdict(float)
    first: dict[str, float] = defaultdict(float)
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        parts = line.split("|")
        self_us, cumulative_us, name = parts[0].split(":")[1], parts[1], parts[2]
        package = name.strip().split(".")[0]
        own[package] += int(self_us) / 1e6
        # Depth 0 (one space after the bar) is an import made by shapline or the interpreter itself.
        if len(name) - len(name.lstrip()) == 1:
            first[package] += int(cumulative_us) / 1e6
    total = sum(own.values())
    table = sorted(((p, own[p], first.get(p, 0.0)) for p in own), key=lambda item: -item[1])
    return total, table


def run(context: Context, params: dict[str, Any]) -> ComparisonResult:
    """The whole flow vs its SHAP compute on a workload of a minute or more; then the fixed cost of a tiny run."""
    # Synthetic data: enough rows for a minute of kernel SHAP (breast_cancer has only 569).
    dataset = synthetic(context.cache, params["data_rows"])
    folder = context.folder("overhead")
    common = {
        "model": {"name": "bench-overhead", "kind": "xgboost", "path": str(dataset.model_path)},
        "background": {"method": "random", "size": params["background"], "seed": 0},
    }

    def kernel_config(name: str, rows: int) -> Path:
        return write_config(
            folder,
            name,
            data={"source": str(dataset.data_path), "target": "target", "explain_rows": rows, "seed": 0},
            explainer={
                "algorithm": "kernel",
                "link": "logit",
                "nsamples": params["nsamples"],
                "l1_reg": "aic",
                "seed": 0,
            },
            shards={"size": params["shard_size"], "runner": "thread", "workers": params["workers"]},
            **common,
        )

    rows = params["rows"]
    if rows == "auto":
        started = time.perf_counter()
        direct_compute(kernel_config("calibration", params["calibration_rows"]), params["workers"])
        per_row = (time.perf_counter() - started) / params["calibration_rows"]
        rows = int(math.ceil(params["target_s"] / per_row / params["shard_size"]) * params["shard_size"])
        context.log(f"  calibration: {per_row * 1e3:.0f} ms/row -> {rows} rows for ~{params['target_s']} s")
    config = kernel_config("overhead", rows)
    result = ComparisonResult(
        name="overhead",
        title="orchestration overhead: whole flow vs the SHAP compute inside it; fixed cost of a tiny run",
        workload={
            "data": f"make_classification {params['data_rows']}x30, rows sampled without replacement",
            "model": "XGBClassifier(50 trees, depth 4)",
            "explainer": f"kernel nsamples={params['nsamples']} background={params['background']} l1_reg=aic",
            "rows": rows,
            "runner": f"thread x{params['workers']}",
            "shard_size": params["shard_size"],
        },
    )
    phases: list[tuple[str, float]] = []
    flow_totals: list[dict[str, float]] = []

    def flow() -> Measurement:
        run_ = run_flow(config)
        assert run_.values is not None
        ids = run_.values.index.to_numpy()
        phases[:] = flow_phases(_flow_run_id(run_.summary), run_.summary["shards_computed"])
        flow_totals.append(run_.metrics)
        return Measurement(
            run_.seconds,
            values_matrix(run_.values, dataset.features, np.sort(ids)),
            {"explain_s": run_.summary["explain_s"], "flow_duration_s": run_.summary["duration_s"]},
        )

    def direct() -> Measurement:
        started = time.perf_counter()
        _, values = direct_compute(config, params["workers"])
        seconds = time.perf_counter() - started
        return Measurement(seconds, values, {"explain_s": seconds, "flow_duration_s": seconds})

    sides = [
        Side(
            "shapline flow", flow, "shapline run: validation, background, shards, aggregation, MLflow, plots"
        ),
        Side(
            "explain_rows direct",
            direct,
            "the same explain_rows on the same shards in a thread pool, no Prefect/files/MLflow",
        ),
    ]
    result.descriptions = {s.name: s.description for s in sides}
    result.sides = alternate(sides, min(context.reps, params["reps"]), False, context.log)
    result.check("explain_rows direct", "shapline flow", KERNEL_TOLERANCE)
    result.ratio(
        Ratio(
            "flow wall / its explain_s",
            "shapline flow",
            "shapline flow",
            "seconds",
            1.15,
            True,
            "same run",
            "explain_s",
        )
    )
    result.ratio(
        Ratio("flow wall / direct compute", "shapline flow", "explain_rows direct", "seconds", 1.15, True)
    )
    result.ratio(
        Ratio(
            "flow explain_s / direct compute",
            "shapline flow",
            "explain_rows direct",
            "explain_s",
            note="Prefect tasks + shard files",
        )
    )
    total = result.median("shapline flow")
    explain = result.median("shapline flow", "explain_s")
    flow_duration = result.median("shapline flow", "flow_duration_s")
    rows = [["whole flow (wall, around the CLI call)", total, 1.0]]
    # Shard tasks run in parallel: their summed run time is not wall time; the explain phase (explain_s) is.
    rows.append(["explain phase: shard tasks on the runner (wall, explain_s)", explain, explain / total])
    serial = [(name, seconds) for name, seconds in phases if name != "explain-shard"]
    shard_sum = sum(seconds for name, seconds in phases if name == "explain-shard")
    rows.append(["  task: explain-shard, summed over parallel shards", shard_sum, None])
    rows += [[f"task: {name}", seconds, seconds / total] for name, seconds in serial]
    rows.append(
        [
            "flow body outside tasks (MLflow logging, staging, config)",
            flow_duration - explain - sum(s for _, s in serial),
            None,
        ]
    )
    rows.append(["engine outside the flow body (run creation, states)", total - flow_duration, None])
    result.tables.append(
        {
            "title": "Where the flow's time goes (last run; Prefect task run times)",
            "columns": ["phase", "seconds", "share"],
            "rows": rows,
        }
    )
    result.notes.append(
        f"explain phase median {explain:.1f} s; the workload must take >= 60 s in a full run."
    )

    small = breast_cancer(context.cache)
    tiny = write_config(
        folder,
        "tiny",
        model={"name": "bench-tiny", "kind": "xgboost", "path": str(small.model_path)},
        data={"source": str(small.data_path), "target": "target", "explain_rows": 5, "seed": 0},
        explainer={"algorithm": "tree"},
        shards={"size": 5, "runner": "thread", "workers": 1},
    )
    fixed: list[list[Any]] = []
    warm = [run_flow(tiny, fetch_values=False) for _ in range(params["tiny_reps"])]
    if warm:
        fixed.append(
            ["tiny run (5 rows, tree), warm process", float(np.median([w.seconds for w in warm])), len(warm)]
        )
        fixed.append(
            ["  of which explain phase", float(np.median([w.summary["explain_s"] for w in warm])), len(warm)]
        )
        duration = float(np.median([w.summary["duration_s"] for w in warm]))
        fixed.append(["  of which the flow body (duration_s)", duration, len(warm)])
        for name, seconds in flow_phases(_flow_run_id(warm[-1].summary), warm[-1].summary["shards_computed"]):
            fixed.append([f"  task: {name}", seconds, 1])
    if params["cold_reps"]:
        cold = [cold_run(tiny, with_server=True) for _ in range(params["cold_reps"])]
        fixed.append(
            ["tiny run, cold `shapline run` process, server already up", float(np.median(cold)), len(cold)]
        )
        own = cold_run(tiny, with_server=False)
        fixed.append(["tiny run, cold process starting its own temporary Prefect server", own, 1])
        total_imports, packages = import_times(tiny)
        fixed.append(
            ["imports in a cold tiny run (python -X importtime, sum of self times)", total_imports, 1]
        )
        result.tables.append(
            {
                "title": "Import time in a cold tiny run, by top-level package (self = time in its own modules)",
                "columns": ["package", "self s", "imported at top level, cumulative s"],
                "rows": [[p, s, c] for p, s, c in packages[:12]],
            }
        )
    if context.server_start_s:
        fixed.append(
            ["temporary Prefect server start (prefect_test_harness, this run)", context.server_start_s, 1]
        )
    result.tables.insert(
        0, {"title": "Fixed cost of a tiny run", "columns": ["what", "seconds", "reps"], "rows": fixed}
    )
    return result
