"""Sides that must run in their own process (for their peak RSS or their own thread settings).

`python -m benchmarks.child JOB_JSON` runs one job and prints one JSON line: seconds, where the values are,
and the process's own peak RSS. The parent measures the whole process tree's RSS from outside.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _maxrss_bytes(who: int) -> int:
    # Linux reports ru_maxrss in KiB.
    return int(resource.getrusage(who).ru_maxrss) * 1024


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _kernel_plain(job: dict[str, Any]) -> dict[str, Any]:
    import joblib
    import pandas as pd

    # Imported before the clock starts, as a notebook has them (the flow side preloads its own): the
    # first row's imports (~0.5 s) used to count as plain shap's time.
    import shap  # noqa: F401

    import shapline.tasks.explainers.explain  # noqa: F401
    from benchmarks.workloads import explain_sample, per_row_kernel_values, random_background

    frame = pd.read_parquet(job["data_path"]).reset_index(drop=True)[job["features"]]
    model = joblib.load(job["model_path"])
    rows = explain_sample(frame, job["rows"], job["seed"])
    background = random_background(frame, job["background"], job["seed"]).to_numpy()
    function = _notebook_function(model, frame, job.get("class_index", 1))
    started = time.perf_counter()
    values = per_row_kernel_values(function, background, rows, job["nsamples"], job["l1_reg"], job["seed"])
    seconds = time.perf_counter() - started
    np.save(job["values_path"], values)
    return {"seconds": seconds}


def _notebook_function(model: Any, frame: Any, class_index: int) -> Any:
    """What a notebook hands shap: the model on shap's arrays, as a frame with the data's dtypes when the
    data has text (a Pipeline's column selectors pick columns by dtype)."""
    import pandas as pd

    columns, dtypes = list(frame.columns), frame.dtypes.to_dict()
    if all(pd.api.types.is_numeric_dtype(t) for t in dtypes.values()):
        return lambda x: model.predict_proba(x)[:, class_index]
    return lambda x: model.predict_proba(pd.DataFrame(x, columns=columns).astype(dtypes))[:, class_index]


def _plain_calls(job: dict[str, Any], clock: Callable[[], float]) -> tuple[Any, Any, Callable[[int], float]]:
    """Plain shap's explainer on the job's rows, only the model's calls timed by `clock`: the rows, the
    background, and a function that makes plain shap's calls for row `i` (f(x), then its nsamples x
    background synthetic rows; l1_reg does not call the model) and returns the model's seconds in them.
    The synthetic rows are shap's own, drawn for each row, and not timed; the background's call happens
    once, when the explainer is made, and is not timed either, as in plain shap."""
    import joblib
    import pandas as pd
    import shap

    from benchmarks.workloads import explain_sample, random_background
    from shapline.tasks.explainers.explain import row_seed

    frame = pd.read_parquet(job["data_path"]).reset_index(drop=True)[job["features"]]
    model = joblib.load(job["model_path"])
    rows = explain_sample(frame, job["rows"], job["seed"])
    background = random_background(frame, job["background"], job["seed"])
    function = _notebook_function(model, frame, job.get("class_index", 1))
    timed = [0.0]

    def clocked(x: Any) -> Any:
        started = clock()
        out = function(x)
        timed[0] += clock() - started
        return out

    explainer = shap.KernelExplainer(clocked, background.to_numpy(), link="logit")

    def row_calls(i: int) -> float:
        timed[0] = 0.0
        np.random.seed(row_seed(job["seed"], int(rows.index[i])))
        explainer.shap_values(
            rows.iloc[i : i + 1].to_numpy(), nsamples=job["nsamples"], l1_reg=False, silent=True
        )
        return timed[0]

    return rows, background, row_calls


def _kernel_model_time(job: dict[str, Any]) -> dict[str, Any]:
    """The model's own time on the calls plain shap makes for the same rows (the physical limit per core)."""
    rows, _, row_calls = _plain_calls(job, time.perf_counter)
    return {"seconds": sum(row_calls(i) for i in range(len(rows))), "rows": len(rows)}


def _kernel_model_calls(job: dict[str, Any]) -> dict[str, Any]:
    """The model's CPU on plain shap's calls and on shapline's engine's calls for the same rows, in this one
    process, row by row in turn (which goes first alternates): their ratio is what shapline's calls save the
    model, with the machine's speed, which moves from one second to the next here, the same for both. Only
    the model's calls are timed, by the CPU time of the thread making them."""
    from shapline.tasks.common.config import ExplainerConfig, SklearnModel, XGBoostModel
    from shapline.tasks.data.background import Background
    from shapline.tasks.explainers.explain import explain_rows
    from shapline.tasks.models.loading import load_predictor

    rows, background, row_calls = _plain_calls(job, time.thread_time)
    class_index = job.get("class_index", 1)
    kind = XGBoostModel if job["model_kind"] == "xgboost" else SklearnModel
    predictor = load_predictor(kind(name="calls", kind=job["model_kind"], path=job["model_path"]))
    config = ExplainerConfig(nsamples=job["nsamples"], l1_reg=job["l1_reg"], seed=job["seed"])

    def shapline(i: int) -> float:
        one = rows.iloc[i : i + 1]
        values = explain_rows(
            one, Background(frame=background), predictor, config, "logit", class_index, "kernel"
        )
        return values.model_cpu_s

    shapline(0)  # the engine's first calls, untimed: the background's and the probe's
    spent = {row_calls: 0.0, shapline: 0.0}
    for i in range(len(rows)):
        for side in (row_calls, shapline) if (i + job["first"]) % 2 == 0 else (shapline, row_calls):
            spent[side] += side(i)
    plain_s, shapline_s = spent[row_calls], spent[shapline]
    return {"seconds": plain_s, "plain_cpu_s": plain_s, "shapline_cpu_s": shapline_s}


JOBS_EXTRA = {"kernel-model-time": _kernel_model_time, "kernel-model-calls": _kernel_model_calls}


def _tree_direct(job: dict[str, Any]) -> dict[str, Any]:
    import joblib
    import pandas as pd

    model = joblib.load(job["model_path"])
    baseline = _rss_bytes()
    started = time.perf_counter()
    data = pd.read_parquet(job["data_path"], columns=job["features"])
    if job["method"] == "shap":
        import shap

        values = shap.TreeExplainer(model).shap_values(data, check_additivity=False)
    else:
        import xgboost

        # pred_contribs' last column is the bias (base value); the rest are the features' SHAP values.
        contributions = model.get_booster().predict(xgboost.DMatrix(data), pred_contribs=True)
        values = contributions[:, :-1]
    seconds = time.perf_counter() - started
    np.save(job["values_path"], np.asarray(values, dtype=float))
    return {"seconds": seconds, "baseline_rss_bytes": baseline}


def preload() -> None:
    """Import what a flow run imports lazily, so a cold process times the run, not its first imports."""
    import great_expectations  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import mlflow  # noqa: F401
    import shap  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import xgboost  # noqa: F401

    import shapline.flows.cli  # noqa: F401
    import shapline.flows.explain  # noqa: F401


def _flow(job: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.workloads import prepare_environment, run_flow

    prepare_environment()
    preload()
    baseline = _rss_bytes()
    run = run_flow(Path(job["config"]), job.get("overrides", []), fetch_values=False)
    return {
        "seconds": run.seconds,
        # The --json line's, to the millisecond (the MLflow metric is rounded to a tenth: 5% of a 2 s phase).
        "explain_s": run.summary["explain_s"],
        "summary": run.summary,
        "baseline_rss_bytes": baseline,
    }


JOBS = {"kernel-plain": _kernel_plain, "tree-direct": _tree_direct, "flow": _flow, **JOBS_EXTRA}


def pinned_core() -> int:
    """The core a per-core side's whole process is pinned to: the last this process may use, so the
    Prefect server (not pinned) and the harness have the others."""
    return max(os.sched_getaffinity(0))


def other_core(core: int) -> int | None:
    """A core this process may use besides `core`, for the second of two pinned processes; None if none."""
    others = sorted(os.sched_getaffinity(0) - {core})
    return others[0] if others else None


def run_child(
    job: dict[str, Any], env: dict[str, str] | None = None, poll_s: float = 0.02, pin: int | None = None
) -> dict[str, Any]:
    """Run one job in a fresh interpreter; add the peak RSS of its whole process tree, polled from outside.

    With `pin`, the interpreter and every thread and process it starts run on that core only (`taskset`).
    The child reads and writes bytecode caches as an installed package does, whatever this shell says
    (PYTHONDONTWRITEBYTECODE would have every flow child compile the modules it imports lazily, ~10 ms in
    the explain phase, a cost plain shap's side, importing shap before its clock, never pays).
    """
    import psutil

    command = [sys.executable, "-m", "benchmarks.child", json.dumps(job)]
    if pin is not None:
        command = ["taskset", "--cpu-list", str(pin), *command]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=err,
            env={**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}, **(env or {})},
            cwd=Path(__file__).resolve().parent.parent,
        )
        root = psutil.Process(process.pid)
        peak = 0
        while process.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(poll_s)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"child {job['kind']} exited {process.returncode}: {stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(tree_peak_rss_bytes=peak, process_wall_s=wall)
    return result


def main(argv: list[str]) -> int:
    """Run the job described by argv[0] (JSON) and print its result as one JSON line."""
    job = json.loads(argv[0])
    result = JOBS[job["kind"]](job)
    result["self_maxrss_bytes"] = _maxrss_bytes(resource.RUSAGE_SELF)
    result["children_maxrss_bytes"] = _maxrss_bytes(resource.RUSAGE_CHILDREN)
    sys.stdout.write("\n" + json.dumps(result, default=str) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
