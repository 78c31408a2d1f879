"""The benchmark harness end to end on tiny sizes: every comparison runs, writes its report, and its sides agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.harness import ComparisonResult, Measurement, Ratio, Tolerance, alternate, render_markdown
from benchmarks.scaling import fit_line
from tests.helpers import exact_shapley

ROOT = Path(__file__).resolve().parent.parent
COMPARISONS = ["kernel", "percore", "overhead", "endpoint", "tree", "scaling", "accuracy"]


def test_alternate_rotates_the_order_and_keeps_every_sample() -> None:
    calls: list[str] = []

    def side(name: str) -> Measurement:
        calls.append(name)
        return Measurement(1.0)

    from benchmarks.harness import Side

    sides = [Side("a", lambda: side("a")), Side("b", lambda: side("b")), Side("c", lambda: side("c"))]
    samples = alternate(sides, reps=3, warmup=False, log=lambda _: None)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {name: len(s) for name, s in samples.items()} == {"a": 3, "b": 3, "c": 3}


def test_ratio_is_withheld_when_values_differ() -> None:
    result = ComparisonResult(name="x", title="x", workload={})
    result.sides = {
        "plain": [Measurement(4.0, np.array([1.0, 2.0]))],
        "fast": [Measurement(1.0, np.array([1.0, 2.5]))],
    }
    assert not result.check("plain", "fast", Tolerance(rtol=0.0, atol=1e-6, why="test"))
    result.ratio(Ratio("speed-up", "plain", "fast", target=2.0))
    assert result.ratios[0]["value"] is None and result.ratios[0]["met"] is None


def test_ratio_of_equal_sides_is_the_ratio_of_medians() -> None:
    result = ComparisonResult(name="x", title="x", workload={})
    values = np.array([1.0, 2.0])
    result.sides = {
        "plain": [Measurement(s, values) for s in (4.0, 9.0, 5.0)],
        "fast": [Measurement(s, values) for s in (1.0, 2.0, 3.0)],
    }
    assert result.check("plain", "fast", Tolerance(rtol=0.0, atol=0.0, why="test"))
    result.ratio(Ratio("speed-up", "plain", "fast", target=2.0))
    assert result.ratios[0]["value"] == pytest.approx(2.5) and result.ratios[0]["met"] is True


def test_fit_line_recovers_fixed_and_per_row_cost() -> None:
    sizes = [10, 100, 1000, 10000]
    fixed, per_row = fit_line(sizes, [2.0 + 0.01 * n for n in sizes])
    assert fixed == pytest.approx(2.0) and per_row == pytest.approx(0.01)


@pytest.mark.slow
def test_quick_run_writes_the_report_and_every_comparison_agrees(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--out",
            str(tmp_path),
            "--cache",
            str(tmp_path / "cache"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text() == render_markdown(report)
    assert report["quick"] is True and report["machine"]["cores"]
    assert [c["name"] for c in report["comparisons"]] == COMPARISONS
    for comparison in report["comparisons"]:
        assert comparison["status"] == "ok", comparison["error"]
        assert comparison["values_equal"] is True
        assert comparison["checks"] and all(check["passed"] for check in comparison["checks"])
        assert len(comparison["sides"]) >= 2
        for side in comparison["sides"].values():
            assert side["reps"] == len(side["seconds"]) >= 1 and side["median_s"] > 0
        for ratio in comparison["ratios"]:
            assert {"name", "value", "target", "met", "note"} <= set(ratio)
            assert ratio["value"] is None or ratio["value"] == ratio["value"]  # reported, not NaN
    endpoint = next(c for c in report["comparisons"] if c["name"] == "endpoint")
    for side in endpoint["sides"].values():
        assert side["metrics"]["too_large"]["median"] == 0 and side["metrics"]["requests"]["median"] > 0


def _interacting_game(masks: np.ndarray) -> np.ndarray:
    z = np.asarray(masks, dtype=float)
    return (
        2.0 * z[:, 0] - z[:, 1] + 3.0 * z[:, 2] * z[:, 3] - 1.5 * z[:, 1] * z[:, 4] * z[:, 5] + 0.5 * z[:, 6]
    )


@pytest.mark.parametrize("n", [7, 8])
def test_leverage_shap_is_exact_when_the_budget_holds_every_coalition(n: int) -> None:
    from benchmarks.leverage import leverage_shap

    values, coalitions = leverage_shap(_interacting_game, n, 2**n - 2, np.random.default_rng(0))
    assert coalitions == 2**n - 2
    # The game of masks as a model: x all ones, one background row of zeros, so f(x_S, b) is the mask S.
    exact = exact_shapley(_interacting_game, np.ones(n), np.zeros((1, n)))
    np.testing.assert_allclose(values, exact, atol=1e-10)


def test_leverage_shap_samples_near_its_budget_and_keeps_efficiency() -> None:
    from benchmarks.leverage import leverage_shap

    n = 12
    weights = np.arange(1.0, n + 1)
    counts = []
    for seed in range(5):
        values, coalitions = leverage_shap(_interacting_game, n, 400, np.random.default_rng(seed))
        counts.append(coalitions)
        ends = _interacting_game(np.vstack([np.zeros(n), np.ones(n)]))
        assert values.sum() == pytest.approx(ends[1] - ends[0], abs=1e-10)
        # A game without interactions is recovered exactly from any sample.
        additive, _ = leverage_shap(lambda z: z @ weights, n, 400, np.random.default_rng(seed))
        np.testing.assert_allclose(additive, weights, atol=1e-9)
    assert 300 <= np.mean(counts) <= 500


def test_two_workers_are_judged_against_the_model_measured_on_both_cores() -> None:
    from benchmarks.percore import _two_core_ratios

    values = np.array([1.0])

    def side(*explain_s: float) -> list[Measurement]:
        return [Measurement(s, values, {"explain_s": s}) for s in explain_s]

    result = ComparisonResult(name="percore", title="x", workload={})
    result.sides = {
        "cancer: plain shap": side(3.0, 3.2, 3.1),
        "cancer: model only": side(1.5, 1.6, 1.55),
        # Both cores at once, each process all the rows: 1.9 s for the job twice, 0.95 for it once.
        "cancer: model only, two at once": side(1.9, 1.8, 2.0),
        "cancer: shapline process x2": side(1.0, 1.1, 1.2),
    }
    result.check(
        "cancer: plain shap", "cancer: shapline process x2", Tolerance(rtol=0.0, atol=0.0, why="test")
    )
    _two_core_ratios(result, "cancer", "cancer: shapline process x2")
    ratios = {r["name"]: r for r in result.ratios}
    judged = ratios["cancer: share of the two-core limit, process x2"]
    assert (
        judged["value"] == pytest.approx(1.9 / 2 / 1.1) and judged["target"] == 0.85 and judged["met"] is True
    )
    assert judged["numerator"] == "cancer: model only, two at once"
    twice = ratios["cancer: share of twice the one-core limit, process x2"]
    assert twice["value"] == pytest.approx(1.55 / 2 / 1.1) and twice["met"] is None
    assert ratios["cancer: plain / shapline process x2, two cores"]["value"] == pytest.approx(3.1 / 1.1)

    # Without the pair (a one-core machine), the limit is twice the one-core one, and nothing else is added.
    del result.sides["cancer: model only, two at once"]
    result.ratios.clear()
    _two_core_ratios(result, "cancer", "cancer: shapline process x2")
    ratios = {r["name"]: r for r in result.ratios}
    assert ratios["cancer: share of the two-core limit, process x2"]["value"] == pytest.approx(1.55 / 2 / 1.1)
    assert "cancer: share of twice the one-core limit, process x2" not in ratios

    # The one-shard side (shards.size at its default) is named by its side: the same ratios, its own names.
    result.sides["cancer: shapline process x2, one shard"] = side(0.9, 1.0, 1.1)
    result.check(
        "cancer: plain shap",
        "cancer: shapline process x2, one shard",
        Tolerance(rtol=0.0, atol=0.0, why="test"),
    )
    _two_core_ratios(result, "cancer", "cancer: shapline process x2, one shard")
    ratios = {r["name"]: r for r in result.ratios}
    one = ratios["cancer: share of the two-core limit, process x2, one shard"]
    assert (
        one["value"] == pytest.approx(1.55 / 2 / 1.0)
        and one["denominator"] == "cancer: shapline process x2, one shard"
    )


def test_the_two_core_share_in_the_same_seconds_takes_the_models_speed_from_each_run() -> None:
    """Each run's own model CPU over its phase, times what shapline's calls save the model (measured in one
    process): the machine's speed, which moves between sides, cancels out of both."""
    from benchmarks.percore import CALLS, _two_core_ratios

    values = np.array([1.0])
    result = ComparisonResult(name="percore", title="x", workload={})
    result.sides = {
        "cancer: plain shap": [Measurement(3.0, values, {"explain_s": 3.0})],
        "cancer: model only": [Measurement(1.5, None, {"explain_s": 1.5})],
        # A slow run and a fast one: the model's share of two cores is 0.8 in both.
        "cancer: shapline process x2": [
            Measurement(s, values, {"explain_s": s, "model_cpu_s": 1.6 * s}) for s in (2.0, 1.0, 1.5)
        ],
        f"cancer: {CALLS}": [
            Measurement(2.2, None, {"explain_s": 2.2, "saved": saved}) for saved in (1.1, 1.2, 1.0)
        ],
    }
    result.check("cancer: plain shap", "cancer: shapline process x2", Tolerance(rtol=0.0, atol=0.0, why="t"))
    _two_core_ratios(result, "cancer", "cancer: shapline process x2")
    ratios = {r["name"]: r for r in result.ratios}
    share = ratios["cancer: the model's share of two cores in the phase, process x2"]
    assert share["value"] == pytest.approx(0.8) and share["target"] is None
    now = ratios["cancer: share of the two-core limit in the same seconds, process x2"]
    assert now["value"] == pytest.approx(0.8 * 1.1) and now["target"] == 0.85 and now["met"] is True
    assert now["denominator"] == f"cancer: {CALLS}"
