from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shapline.tasks.common.config import OutputConfig
from shapline.tasks.common.markup import script_json
from shapline.tasks.explainers.explain import ShardValues
from shapline.tasks.results import plots
from shapline.tasks.results.aggregate import global_importance
from shapline.tasks.results.plots import bar_values, read_plotted_rows, read_rows_at, render_plots

FEATURES = ["mins", "state"]


def values_and_rows(
    tmp_path: Path, labels: list[str], n: int = 30
) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    rows = pd.DataFrame({"mins": rng.normal(size=n), "state": rng.choice(["KS", "OH", None], size=n)})
    values = rng.normal(size=(n, 2, len(labels)))
    output = values.sum(axis=1)
    output[[3, 7, 11]] = output.max()  # ties: the waterfalls keep row order among equal outputs
    shard = ShardValues(
        row_ids=np.arange(n),
        features=FEATURES,
        labels=labels,
        values=values,
        base_values=np.zeros((n, len(labels))),
        model_output=output,
        algorithm="kernel",
        link="logit",
    )
    frame = shard.to_table().to_pandas()
    path = tmp_path / "shap_values.parquet"
    frame.to_parquet(path, index=False)
    return path, pd.read_parquet(path), rows


def test_single_output_plots_have_the_contract_names(tmp_path: Path) -> None:
    path, values, rows = values_and_rows(tmp_path, ["1"])
    written = render_plots(path, rows, FEATURES, ["1"], OutputConfig(top_k=3), tmp_path / "plots")
    names = sorted(p.name for p in written)
    top = values.sort_values("model_output", ascending=False, kind="stable")["row_id"].head(3)
    low = values.sort_values("model_output", kind="stable")["row_id"].head(3)
    waterfalls = [f"waterfall_{i}.png" for i in [*top, *low]]
    assert names == sorted(["bar.png", "beeswarm.png", "force.html", *waterfalls])
    from PIL import Image

    pictures = {p.name: Image.open(p) for p in written if p.suffix == ".png"}
    for name, picture in pictures.items():
        # Drawn at 10 inches and 144 dpi (the tight bounding box trims a margin), with something on it.
        assert picture.format == "PNG" and picture.width >= 0.8 * plots.FIGURE_WIDTH_IN * plots.DPI, name
        assert len(picture.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50, f"{name} is blank"
    waterfalls = [picture.tobytes() for name, picture in pictures.items() if name.startswith("waterfall_")]
    assert len(set(waterfalls)) == 6, "each waterfall draws its own row"
    page = (tmp_path / "plots" / "force.html").read_text()
    draw = re.findall(r"<script>(.*?)</script>", page, flags=re.S)[-1]
    data = json.loads(draw[draw.index("{") : draw.rindex("}") + 1])
    assert data["featureNames"] == FEATURES and len(data["explanations"]) == len(values)


HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(2)>', "</SCRIPT><!--", "a\u2028b & c"]


def test_the_force_plot_keeps_hostile_names_and_values_as_data(tmp_path: Path) -> None:
    """Names and values go into the force plot's script as JSON no `</script>` can end, and only the page's
    own two scripts may run (their sha256 in the Content-Security-Policy)."""
    import base64
    import hashlib
    import html
    import json
    import re

    import shap

    plot = shap.plots.force(0.5, np.array([0.1, -0.2, 0.3, 0.05]), np.array(HOSTILE, dtype=object), HOSTILE)
    page = plots.write_force_html(tmp_path / "force.html", plot, "m · <b>title</b>").read_text()
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", page, flags=re.S)
    assert len(scripts) == 2  # the bundle and the call that draws; nothing else made a script element
    draw = scripts[1]
    data = json.loads(
        draw[draw.index("createElement(SHAP.AdditiveForceVisualizer, ") + 44 : draw.rindex("),")]
    )
    assert data == json.loads(json.dumps(plot.data))  # every name and value, exactly
    assert "<" not in draw and ">" not in draw.replace("=>", "")
    policy = html.unescape(re.search(r'Content-Security-Policy" content="([^"]*)"', page)[1])
    for code in scripts:
        digest = base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in policy
    assert (
        "default-src 'none'" in policy and "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]
    )
    assert "<b>title</b>" not in page and "&lt;b&gt;title&lt;/b&gt;" in page


def test_script_json_reads_back_the_same_value() -> None:
    value = {"names": HOSTILE, "x": [1.5, None]}
    text = script_json(value)
    assert json.loads(text) == value
    assert not set("<>&\u2028\u2029") & set(text)


def test_several_classes_get_one_file_per_class(tmp_path: Path) -> None:
    path, _, rows = values_and_rows(tmp_path, ["no", "yes"])
    written = {
        p.name
        for p in render_plots(
            path,
            rows,
            FEATURES,
            ["no", "yes"],
            OutputConfig(top_k=1, plots=["bar", "beeswarm", "force"]),
            tmp_path / "plots",
        )
    }
    assert written == {"bar.png", "beeswarm_no.png", "beeswarm_yes.png", "force_no.html", "force_yes.html"}


@pytest.mark.parametrize("labels", [["1"], ["no", "yes"]])
def test_plotted_rows_are_those_of_the_whole_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, labels: list[str]
) -> None:
    # Small limits and batches, so the sample is a subset and crosses batch boundaries.
    monkeypatch.setattr(plots, "MAX_PLOTTED_ROWS", 7)
    monkeypatch.setattr(plots, "MAX_FORCE_ROWS", 5)
    monkeypatch.setattr(plots, "READ_BATCH_ROWS", 4)
    path, values, _ = values_and_rows(tmp_path, labels)
    plotted = read_plotted_rows(path, labels, OutputConfig(top_k=4))
    for label in labels:
        part = values[values["class"] == label] if len(labels) > 1 else values
        expected = {
            "beeswarm": part.iloc[np.linspace(0, len(part) - 1, 7).astype(int)],
            "waterfall": part.sort_values("model_output", ascending=False, kind="stable").head(4),
            "force": part.iloc[np.linspace(0, len(part) - 1, 5).astype(int)],
        }
        for plot, rows in expected.items():
            pd.testing.assert_frame_equal(getattr(plotted[label], plot), rows, check_index_type=False)


def test_rows_at_positions_are_read_across_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots, "READ_BATCH_ROWS", 4)
    path, values, _ = values_and_rows(tmp_path, ["1"])
    positions = np.array([0, 3, 4, 5, 17, 29])
    pd.testing.assert_frame_equal(
        read_rows_at(path, positions), values.iloc[positions], check_index_type=False
    )
    assert read_rows_at(path, np.empty(0, dtype=np.int64)).empty


@pytest.mark.parametrize("labels", [["1"], ["no", "yes"]])
@pytest.mark.parametrize("from_importance", [True, False])
def test_bar_values_are_mean_abs_over_every_row(
    tmp_path: Path, labels: list[str], from_importance: bool
) -> None:
    path, values, _ = values_and_rows(tmp_path, labels, n=1000)
    importance = global_importance(path, FEATURES, ["mean", "mean_abs"], labels) if from_importance else None
    bars = bar_values(path, FEATURES, labels, importance)
    for label in labels:
        part = values[values["class"] == label] if len(labels) > 1 else values
        # What the bar chart computed from the whole values matrix; equal to the last bit.
        np.testing.assert_array_equal(bars[label], np.abs(part[FEATURES].to_numpy(dtype=float)).mean(0))


@pytest.mark.parametrize("labels", [["1"], ["no", "yes"]])
def test_bar_chart_is_the_one_drawn_from_every_row(tmp_path: Path, labels: list[str]) -> None:
    import shap

    path, values, rows = values_and_rows(tmp_path, labels, n=1000)
    config = OutputConfig(plots=["bar"])
    importance = global_importance(path, FEATURES, config.aggregations, labels)
    render_plots(path, rows, FEATURES, labels, config, tmp_path / "plots", importance)
    max_display = max(config.top_k, 10)
    if len(labels) > 1:
        per_class = [values.loc[values["class"] == label, FEATURES].to_numpy(dtype=float) for label in labels]
        shap.summary_plot(
            per_class,
            feature_names=FEATURES,
            class_names=labels,
            plot_type="bar",
            max_display=max_display,
            show=False,
        )
    else:
        every_row = shap.Explanation(values=values[FEATURES].to_numpy(dtype=float), feature_names=FEATURES)
        shap.plots.bar(every_row, max_display=max_display, show=False)
    title = (
        "model · mean |SHAP value| per class" if len(labels) > 1 else "model · output 1 · mean |SHAP value|"
    )
    reference = plots._save(tmp_path / "reference.png", title)
    assert (tmp_path / "plots" / "bar.png").read_bytes() == reference.read_bytes()


def test_every_plot_is_titled_with_the_model_the_class_and_the_units(tmp_path: Path) -> None:
    from PIL import Image

    from shapline.tasks.explainers.choice import ExplainedOutput

    path, _, rows = values_and_rows(tmp_path, ["1"], n=50)
    explained = [
        ExplainedOutput(
            label="malignant", output="probability of malignant", short="P(malignant)", units="log-odds"
        )
    ]
    titles: list[str] = []
    original = plots._save

    def remember(target: Path, title: str | None = None, xlabel: str | None = None) -> Path:
        titles.append(f"{target.name}: {title} | {xlabel}")
        return original(target, title, xlabel)

    plots._save = remember
    try:
        written = render_plots(
            path,
            rows,
            FEATURES,
            ["1"],
            OutputConfig(plots=["bar", "beeswarm", "waterfall"], top_k=1),
            tmp_path / "plots",
            None,
            explained,
            "cancer",
        )
    finally:
        plots._save = original
    assert (
        titles[0]
        == "bar.png: cancer · P(malignant) · SHAP values in log-odds · mean |SHAP value| | mean |SHAP value| (log-odds)"
    )
    assert titles[1].startswith("beeswarm.png: cancer · P(malignant) · SHAP values in log-odds · 50 rows")
    assert "SHAP value (log-odds of P(malignant))" in titles[1]
    assert (
        titles[2].startswith("waterfall_")
        and "row_id" in titles[2]
        and "model output" in titles[2]
        and "(P = " in titles[2]
    )
    width, _ = Image.open(written[0]).size
    assert width >= 1200  # readable on a laptop: about 10 inches at 144 dpi (bbox_inches="tight" trims)


def test_waterfalls_contrast_the_highest_with_the_lowest_and_the_nearest_the_threshold(
    tmp_path: Path,
) -> None:
    """Examples on both sides: top_k highest, top_k lowest, top_k nearest the decision threshold (log-odds 0),
    each row once, named by its id (made file-safe, unique) and listed by group as the report shows them."""
    from shapline.tasks.explainers.choice import ExplainedOutput

    path, values, rows = values_and_rows(tmp_path, ["1"])
    frame = pd.read_parquet(path)
    ids = [f"cust/{i:02d}" for i in range(len(frame))]
    ids[1], ids[2] = "a b", "a_b"  # make the same file name: each keeps a file of its own
    frame.insert(1, "customer", ids)
    frame.to_parquet(path, index=False)
    explained = [ExplainedOutput(label="1", output="probability of 1", short="P(1)", units="log-odds")]
    config = OutputConfig(plots=["waterfall"], top_k=3)
    written = render_plots(
        path, rows, FEATURES, ["1"], config, tmp_path / "plots", None, explained, "m", "customer"
    )
    output = frame.set_index("customer")["model_output"]
    highest = list(output.sort_values(ascending=False, kind="stable").index[:3])
    lowest = list(output.drop(highest).sort_values(kind="stable").index[:3])
    nearest = list(output.drop(highest + lowest).abs().sort_values(kind="stable").index[:3])
    groups = written.waterfalls["1"]
    assert [group for group, _ in groups] == [
        "highest model output",
        "lowest model output",
        "nearest the decision threshold",
    ]
    named = {name.removeprefix("waterfall_").removesuffix(".png") for _, files in groups for name in files}
    assert len(named) == 9
    for (_, files), expected in zip(groups, (highest, lowest, nearest), strict=True):
        assert [name.removeprefix("waterfall_").removesuffix(".png")[:7] for name in files] == [
            i.replace("/", "_").replace(" ", "_")[:7] for i in expected
        ]
    assert sorted(p.name for p in written) == sorted(name for _, files in groups for name in files)
    # No threshold for a regression: its contrast is the lowest outputs only.
    regression = [
        ExplainedOutput(label="1", output="prediction", short="prediction", units="units of the target")
    ]
    drawn = render_plots(path, rows, FEATURES, ["1"], config, tmp_path / "regression", None, regression, "m")
    assert [g for g, _ in drawn.waterfalls["1"]] == [
        "highest model output",
        "lowest model output",
    ]


def test_colliding_ids_each_keep_a_waterfall_file() -> None:
    from shapline.tasks.results.plots import waterfall_names

    rows = pd.DataFrame({"row_id": [0, 1, 2], "customer": ["a b", "a_b", "c/d"]})
    names = waterfall_names(rows, "customer")
    assert names[1] == "a_b" and names[0].startswith("a_b-") and names[2] == "c_d" and len(set(names)) == 3
    assert waterfall_names(rows, None) == ["0", "1", "2"]


def test_waterfalls_draw_each_values_standard_error_as_a_bar(tmp_path: Path) -> None:
    """With shap_standard_errors.parquet, each waterfall bar carries ± one standard error (shap's own
    error bars, from the Explanation's bounds) and its title says so; an errors file whose rows are not the
    values table's is refused rather than drawn on the wrong rows."""
    from PIL import Image

    path, values, rows = values_and_rows(tmp_path, ["1"])
    errors = values[["row_id"]].copy()
    for feature in FEATURES:
        errors[feature] = 0.3
    errors_path = tmp_path / "shap_standard_errors.parquet"
    errors.to_parquet(errors_path, index=False)
    config = OutputConfig(plots=["waterfall"], top_k=1)
    titles: list[str] = []
    original = plots._save

    def remember(target: Path, title: str | None = None, xlabel: str | None = None) -> Path:
        titles.append(title or "")
        return original(target, title, xlabel)

    plots._save = remember
    try:
        plain = render_plots(path, rows, FEATURES, ["1"], config, tmp_path / "plain")
        barred = render_plots(
            path, rows, FEATURES, ["1"], config, tmp_path / "barred", errors_path=str(errors_path)
        )
    finally:
        plots._save = original
    assert [p.name for p in plain] == [p.name for p in barred]
    assert not any("standard error" in t for t in titles[: len(plain)])
    assert all("± 1 standard error (largest 0.3)" in t for t in titles[len(plain) :])
    for without, with_bars in zip(plain, barred, strict=True):
        assert Image.open(without).tobytes() != Image.open(with_bars).tobytes()
    bounds = plots._explanation(values.iloc[:2], rows, FEATURES, errors.iloc[:2])
    assert np.allclose(bounds.upper_bounds - bounds.values, 0.3)
    assert np.allclose(bounds.values - bounds.lower_bounds, 0.3)

    errors.iloc[::-1].to_parquet(errors_path, index=False)
    with pytest.raises(ValueError, match="shap_standard_errors.parquet: its rows are not the values table"):
        render_plots(path, rows, FEATURES, ["1"], config, tmp_path / "wrong", errors_path=str(errors_path))
