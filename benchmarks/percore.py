"""Comparison: Kernel SHAP per core, like for like, for every way a model is stored.

Every side runs in a fresh process with OpenMP and BLAS at one thread, and the per-core sides (plain
shap.KernelExplainer, the model alone on plain shap's calls, shapline with one worker) with that whole
process pinned to one core (`taskset`): shapline's own threads (Prefect's client, its logs, heartbeats)
share the core with the compute, as they do on a one-core worker; the Prefect server runs outside it.
The model's own time on plain shap's calls is the limit (a kernel explainer cannot be faster than the
model it calls). shapline runs once per way a user stores the model: a pickled estimator (joblib),
XGBoost's own .json and .ubj files, the MLflow registry (xgboost and sklearn flavours); a benchmark that
measures only the path the developers chose is how a slow one went unnoticed (issue 24). Two workloads:
the breast-cancer XGBoost model (30 numeric features) and the demo's penguins Pipeline (text, numbers,
missing values); and shapline with two process workers on two cores against twice the one-core limit.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from benchmarks.child import other_core, pinned_core, run_child
from benchmarks.harness import ComparisonResult, Context, Measurement, Ratio, Side, alternate
from benchmarks.kernel import ONE_THREAD, child_flow_side, kernel_config
from benchmarks.workloads import (
    KERNEL_TOLERANCE,
    Dataset,
    breast_cancer,
    explain_sample,
    penguins,
    registry_model,
    xgboost_file,
)
from shapline.tasks.common.config import ShardsConfig

FULL = {"rows": 32, "nsamples": "auto", "background": 50, "l1_reg": "aic", "seed": 0, "shards": 4}
QUICK = {"rows": 4, "nsamples": 300, "background": 10, "l1_reg": "aic", "seed": 0, "shards": 2}
WORKLOADS = {
    "cancer": "breast_cancer 569x30, XGBClassifier(100 trees, depth 4)",
    "penguins": "penguins 344x7 (text, numbers, NaN), Pipeline(impute, one-hot, logistic)",
}
# Every way each workload's model can be stored, each explained by shapline at one worker on one core.
STORAGES = {
    "cancer": ("joblib", "json", "ubj", "mlflow-xgboost", "mlflow-sklearn"),
    "penguins": ("joblib", "mlflow-sklearn"),
}
STORAGE_SAID = {
    "joblib": "a pickled estimator (joblib.dump)",
    "json": "XGBoost's .json (save_model), model.kind xgboost",
    "ubj": "XGBoost's .ubj (save_model), model.kind xgboost",
    "mlflow-xgboost": "the MLflow registry, mlflow.xgboost.log_model",
    "mlflow-sklearn": "the MLflow registry, mlflow.sklearn.log_model",
}
# Issue 24's targets: plain / shapline x1 per core, its share of the limit, and with two process workers
# the share of the two-core limit (the model alone on both cores at once, measured).
PER_CORE = {"cancer": 1.8, "penguins": 5.0}
SHARE = {"cancer": 0.9, "penguins": None}
TWO_CORES = {"cancer": 0.85, "penguins": None}
# The niceness one two-core side's temporary Prefect server runs at (SHAPLINE_SERVER_NICENESS).
NICE_SERVER = 19
# shards.size as a config that does not set it has it: the one-shard sides (a shard task costs the flow
# ~5-7 ms of Prefect's bookkeeping, a Pipeline call ~4 ms whatever its rows).
DEFAULT_SHARD_SIZE = ShardsConfig().size
# The model's CPU on plain shap's calls over that on shapline's engine's calls, both in one pinned process, row
# by row in turn: what shapline's calls save the model (fewer rows where they repeat, a layout it reads
# faster), at one moment's speed of the machine.
CALLS = "model on plain shap's calls / on shapline's"
CALLS_SAID = (
    "the model's CPU on plain shap's calls and on shapline's engine's calls for the same rows, in one process "
    "on one core, row by row in turn; only the model's calls are timed"
)
# No side here reports its memory: the harness polls it rarely, not every 20 ms (~1 ms of CPU a poll, 5%
# of a core taken from the two-core sides).
POLL_S = 0.5


def _workload(context: Context, name: str) -> Dataset:
    return breast_cancer(context.cache) if name == "cancer" else penguins(context.cache)


def _model(context: Context, name: str, storage: str, dataset: Dataset) -> dict[str, Any]:
    """The config's model section for `storage`: the same model, stored that way."""
    model: dict[str, Any] = {"name": f"bench-percore-{name}-{storage}", "class_index": 1}
    if storage == "joblib":
        return {
            **model,
            "kind": "xgboost" if name == "cancer" else "sklearn",
            "path": str(dataset.model_path),
        }
    if storage in ("json", "ubj"):
        return {**model, "kind": "xgboost", "path": str(xgboost_file(dataset, f".{storage}"))}
    flavour = storage.removeprefix("mlflow-")
    # The store every flow run of the benchmark logs to (write_config's): its registry holds the model.
    tracking_uri = f"sqlite:///{context.work / 'mlflow.db'}"
    folder = context.folder("percore-registry")
    uri = registry_model(dataset, flavour, tracking_uri, folder, f"bench-percore-{name}-{flavour}")
    return {**model, "kind": "mlflow", "uri": uri, "tracking_uri": tracking_uri}


def _sides(context: Context, params: dict[str, Any], name: str, core: int) -> list[Side]:
    said = WORKLOADS[name]
    dataset = _workload(context, name)
    frame = dataset.frame()[dataset.features]
    rows = explain_sample(frame, params["rows"], params["seed"])
    row_ids = rows.index.to_numpy()
    folder = context.folder(f"percore-{name}")
    shard_size = max(1, math.ceil(len(rows) / params["shards"]))
    job = {
        "data_path": str(dataset.data_path),
        "model_path": str(dataset.model_path),
        "features": dataset.features,
        "class_index": 1,
        **{key: params[key] for key in ("rows", "seed", "background", "nsamples", "l1_reg")},
    }

    def plain() -> Measurement:
        values_path = folder / "plain.npy"
        child = run_child(
            {**job, "kind": "kernel-plain", "values_path": str(values_path)},
            env=ONE_THREAD,
            pin=core,
            poll_s=POLL_S,
        )
        return Measurement(child["seconds"], np.load(values_path), {"explain_s": child["seconds"]})

    def model_seconds(pin: int | None) -> float:
        """The model's own seconds on plain shap's calls, in a fresh process on core `pin`."""
        return float(
            run_child({**job, "kind": "kernel-model-time"}, env=ONE_THREAD, pin=pin, poll_s=POLL_S)["seconds"]
        )

    def model_time() -> Measurement:
        seconds = model_seconds(core)
        return Measurement(seconds, None, {"explain_s": seconds})

    def model_time_two_cores() -> Measurement:
        """The limit's job twice at once, each child on a core of its own: what two cores give the model."""
        with ThreadPoolExecutor(2) as pool:
            seconds = max(pool.map(model_seconds, [core, other_core(core)]))
        return Measurement(seconds, None, {"explain_s": seconds})

    order = itertools.count()

    def model_calls() -> Callable[[], Measurement]:
        def run() -> Measurement:
            calls = {
                **job,
                "kind": "kernel-model-calls",
                "first": next(order) % 2,  # which side starts, row by row, alternates too
                "model_kind": "xgboost" if name == "cancer" else "sklearn",
            }
            child = run_child(calls, env=ONE_THREAD, pin=core, poll_s=POLL_S)
            plain_s, shapline_s = child["plain_cpu_s"], child["shapline_cpu_s"]
            return Measurement(
                plain_s + shapline_s, None, {"explain_s": plain_s, "saved": plain_s / shapline_s}
            )

        return run

    def shapline(
        storage: str,
        runner: str,
        workers: int,
        pin: int | None,
        size: int = shard_size,
        env: dict[str, str] = ONE_THREAD,
    ) -> Callable[[], Measurement]:
        config = kernel_config(
            folder,
            f"{name}-{storage}-{size}",
            _model(context, name, storage, dataset),
            dataset.data_path,
            len(rows),
            params,
            size,
        )
        overrides = [f"shards.runner={runner}", f"shards.workers={workers}"]
        return child_flow_side(config, row_ids, dataset.features, overrides, env, pin, POLL_S)

    sides = [
        Side(f"{name}: plain shap", plain, f"{said}: shap.KernelExplainer, a loop over rows, 1 core"),
        Side(
            f"{name}: model only", model_time, f"{said}: the model's time on plain shap's calls (the limit)"
        ),
    ]
    storages = STORAGES[name][:2] if context.quick else STORAGES[name]
    for storage in storages:
        sides.append(
            Side(
                f"{name}: shapline x1, {storage}",
                shapline(storage, "thread", 1, core),
                f"{said}, stored as {STORAGE_SAID[storage]}: the flow, 1 thread worker, its whole process "
                "on 1 core",
            )
        )
    if not context.quick:
        # Every storage at the shard size a config gets when it sets none, too: what each way of storing the
        # model costs, apart from a Prefect task per 8 rows (the sides above: ~15-20 ms of the pinned core
        # a shard task, 3-4% of the phase).
        for storage in storages:
            sides.append(
                Side(
                    f"{name}: shapline x1, {storage}, one shard",
                    shapline(storage, "thread", 1, core, DEFAULT_SHARD_SIZE),
                    f"{said}, stored as {STORAGE_SAID[storage]}: the flow, 1 thread worker, its whole process "
                    f"on 1 core, shards.size left at its default ({DEFAULT_SHARD_SIZE}): the {len(rows)} rows "
                    f"in one shard task, where the sides above have {params['shards']}",
                )
            )
        if name == "cancer" and other_core(core) is not None:
            sides.append(
                Side(
                    f"{name}: model only, two at once",
                    model_time_two_cores,
                    f"{said}: the model's time on plain shap's calls, in two processes at once, each on its own "
                    "core (each does all the rows): the two-core limit, and whether two cores slow the model down",
                )
            )
        if name == "cancer":
            sides.append(
                Side(
                    f"{name}: shapline x1, joblib, not pinned",
                    shapline("joblib", "thread", 1, None),
                    f"{said}: the flow, 1 thread worker, its other threads free to use a second core",
                )
            )
        sides.append(
            Side(
                f"{name}: shapline process x2",
                shapline("joblib", "process", 2, None),
                f"{said}: the flow, 2 process workers, 1 thread each, 2 cores",
            )
        )
        if name == "cancer":
            # The flow's own temporary server (no PREFECT_API_URL), which it starts before the flow and runs
            # at niceness 19: what SHAPLINE_SERVER_NICENESS buys the workers (the other sides share the
            # benchmark's server, at normal priority, as a server the user started would be).
            niced = {
                **ONE_THREAD,
                "PREFECT_API_URL": "",
                "SHAPLINE_SERVER_NICENESS": str(NICE_SERVER),
                "PREFECT_HOME": str(folder / "prefect-home"),
            }
            sides.append(
                Side(
                    f"{name}: shapline process x2, server niceness {NICE_SERVER}",
                    shapline("joblib", "process", 2, None, env=niced),
                    f"{said}: as 'shapline process x2', but the flow starts its own temporary Prefect server "
                    f"and runs it at niceness {NICE_SERVER} (SHAPLINE_SERVER_NICENESS={NICE_SERVER})",
                )
            )
        sides.append(
            Side(
                f"{name}: shapline process x2, one shard",
                shapline("joblib", "process", 2, None, DEFAULT_SHARD_SIZE),
                f"{said}: the flow, 2 process workers, 1 thread each, 2 cores, shards.size left at its default "
                f"({DEFAULT_SHARD_SIZE}): the {len(rows)} rows in one shard, whose rows both workers explain",
            )
        )
        if name == "cancer":
            sides.append(Side(f"{name}: {CALLS}", model_calls(), f"{said}: {CALLS_SAID}"))
    return sides


def run(context: Context, params: dict[str, Any]) -> ComparisonResult:
    core = pinned_core()
    result = ComparisonResult(
        name="percore",
        title="Kernel SHAP per core (one native thread, one core): plain shap vs shapline for every way a "
        "model is stored, and the limit",
        workload={
            "rows": params["rows"],
            "background": params["background"],
            "nsamples": params["nsamples"],
            "l1_reg": params["l1_reg"],
            "link": "logit",
            "threads": "OMP/OpenBLAS/MKL = 1 on every side",
            "core": f"per-core sides: the whole process on core {core} (taskset); Prefect's server outside it",
        },
    )
    names = ["cancer"] if context.quick else list(WORKLOADS)  # quick: proof that the harness works
    sides = [side for name in names for side in _sides(context, params, name, core)]
    result.descriptions = {s.name: s.description for s in sides}
    result.sides = alternate(sides, context.reps, False, context.log)
    for name in names:
        plain, limit = f"{name}: plain shap", f"{name}: model only"
        shapline = [s.name for s in sides if s.name.startswith(f"{name}: shapline")]
        for side in shapline:
            result.check(plain, side, KERNEL_TOLERANCE)
        result.ratio(
            Ratio(
                f"{name}: limit (plain / model only)",
                plain,
                limit,
                "explain_s",
                note="how much faster than plain shap a kernel explainer could be on one core",
            )
        )
        for side in shapline:
            if "process" in side:
                continue
            how = side.removeprefix(f"{name}: shapline x1, ")
            pinned = "not pinned" not in how
            result.ratio(
                Ratio(
                    f"{name}: plain / shapline x1, {how}",
                    plain,
                    side,
                    "explain_s",
                    PER_CORE[name] if pinned else None,
                    note="explain phase, one native thread"
                    + (", the whole process on one core" if pinned else ", other threads on any core"),
                )
            )
            result.ratio(
                Ratio(
                    f"{name}: share of the limit, {how}",
                    limit,
                    side,
                    "explain_s",
                    SHARE[name] if pinned else None,
                    note="(plain / shapline x1) / (plain / model only): 1 is as fast as the model allows",
                )
            )
            _model_share(result, f"{name}: the model's share of the phase, {how}", side, 1)
        for side in shapline:
            if "process" in side:
                _two_core_ratios(result, name, side)
        pair = f"{name}: model only, two at once"
        if pair in result.sides:
            result.ratio(
                Ratio(
                    f"{name}: model on two cores at once, speed of one",
                    limit,
                    pair,
                    "explain_s",
                    note="model only / model only two at once (each all the rows): 1 is two cores as fast as "
                    "one each, below 1 the two-core limit is less than twice the one-core one",
                )
            )
    result.notes.append(
        "Limit: the model's own seconds on the calls plain shap makes (f(x) and the nsamples x background "
        "synthetic rows per explained row, as numpy arrays, one native thread). shapline at x1 is within "
        "(plain / shapline x1) / (plain / model only) of that limit. The two-core limit is the model alone on "
        "both cores at once (two processes, each pinned to its core, each making all of plain shap's calls: "
        "the job twice in the slower one's time); with two workers shapline is within "
        "(model only, two at once / 2) / shapline x2 of it."
    )
    result.notes.append(
        f"Per core: plain shap, the model alone and every shapline x1 side run with their whole process "
        f"pinned to core {core} (`taskset --cpu-list {core}`); the Prefect server is its own process, "
        "unpinned. 'not pinned' is the same flow with its process free to use every core."
    )
    return result


def _model_share(result: ComparisonResult, name: str, side: str, workers: int) -> float | None:
    """The share of the workers' cores the model itself used in the explain phase, measured in the same seconds:
    median over the side's runs of model_cpu_s / (workers x explain_s), from the flow's own summary.

    The limit sides measure the model at other moments; on a VM whose speed moves 50% from one minute to
    the next (see docs/performance.md) their ratio with a flow's phase carries that noise, this one does
    not. It is a lower bound of the share of the limit at that moment: shapline sends the model no more
    rows than plain shap does (fewer where rows repeat) and in a layout it reads no slower.
    """
    runs = [m.extra for m in result.sides[side] if "model_cpu_s" in m.extra]
    value = statistics.median(r["model_cpu_s"] / (workers * r["explain_s"]) for r in runs) if runs else None
    result.record_ratio(
        name,
        value,
        note=f"model_cpu_s / ({workers} x explain_s), each run's own, median: a lower bound of the share of "
        "the limit in the same seconds (no noise from the machine's speed between sides)",
        numerator=side,
        denominator=side,
        metric=f"model_cpu_s / ({workers} x explain_s)",
    )
    return value


def _two_core_ratios(result: ComparisonResult, name: str, process: str) -> None:
    """Two process workers (side `process`) against plain shap and against the two-core limit.

    The limit is what two cores give the model, measured where the comparison ran the model alone on both
    cores at once: each process made all of plain shap's calls, so the cores did the job twice in the
    slower one's time. Twice the one-core limit assumes each core runs the model as fast as one core alone,
    which a shared VM does not always give; it is reported beside it.
    """
    plain, limit = f"{name}: plain shap", f"{name}: model only"
    pair, how = f"{name}: model only, two at once", process.removeprefix(f"{name}: shapline ")
    result.ratio(
        Ratio(
            f"{name}: plain / shapline {how}, two cores",
            plain,
            process,
            "explain_s",
            note="plain shap on one core; shapline on two",
        )
    )
    share_now = _model_share(
        result, f"{name}: the model's share of two cores in the phase, {how}", process, 2
    )
    calls = f"{name}: {CALLS}"
    if calls in result.sides:
        saved = result.median(calls, "saved")
        result.record_ratio(
            f"{name}: share of the two-core limit in the same seconds, {how}",
            None if share_now is None else share_now * saved,
            TWO_CORES[name],
            note=f"the model's share of two cores in the phase x (plain shap's calls / shapline's, {saved:.3f}): "
            "the share of the two-core limit with the model's speed taken in the phase itself, not at another "
            "moment",
            numerator=process,
            denominator=calls,
            metric="model_cpu_s / (2 x explain_s) x saved",
        )
    measured = pair in result.sides
    share = twice = None
    if result.values_equal:
        shapline = result.median(process, "explain_s")
        share = result.median(pair if measured else limit, "explain_s") / (2 * shapline)
        twice = result.median(limit, "explain_s") / (2 * shapline)
    result.record_ratio(
        f"{name}: share of the two-core limit, {how}",
        share,
        TWO_CORES[name],
        note="(model only, two at once / 2) / shapline process x2: the model's own time on two cores, measured"
        if measured
        else "(plain / shapline process x2) / (2 x plain / model only)",
        numerator=pair if measured else limit,
        denominator=process,
        metric="explain_s / (2 x explain_s)",
    )
    if measured:
        result.record_ratio(
            f"{name}: share of twice the one-core limit, {how}",
            twice,
            note="(plain / shapline process x2) / (2 x plain / model only): as if each core ran the model as "
            "fast as one core alone",
            numerator=limit,
            denominator=process,
            metric="explain_s / (2 x explain_s)",
        )
