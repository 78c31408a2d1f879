"""The docs' drift walkthrough, run exactly as written from a clean folder, and what it shows.

The commands are read from docs/drift-and-report.md ("Seeing drift"), so the page and this test cannot
drift apart: `<run N>` is the id the N-th command's run printed. What the page says they show (the
quoted lines, the measured numbers) is checked in their output, and the same runs serve the checks of
what a demo run leaves: categories, examples on both sides named by id, the report, the description, the
Prefect artifact, an empty shard cache.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from shapline.flows.cli import main
from tests.helpers import artifact

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "drift-and-report.md"
MINUS = "\u2212"


def walkthrough() -> list[str]:
    """The command lines of the page's walkthrough, in order."""
    text = PAGE.read_text()
    section = text[text.index("## Seeing drift") :]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith(".venv/bin/shapline")]


def said_on_the_page(quote: str) -> bool:
    """Whether the page says `quote` (its lines wrapped anywhere)."""
    return " ".join(quote.split()) in " ".join(PAGE.read_text().split())


NUMBER = re.compile(r"\d+(?:\.\d+)?")


def shows(quote: str, text: str) -> bool:
    """Whether `text` says what the page quotes, a measured number off by at most one in its last digit (the
    explainer's rounding moves as the explainer is worked on; the words and every other digit may not)."""
    words = NUMBER.split(quote)
    numbers = NUMBER.findall(quote)
    pattern = "(\\d+(?:\\.\\d+)?)".join(re.escape(part) for part in words)
    for found in re.finditer(pattern, text):
        close = [
            len(seen) == len(said)
            and abs(float(seen) - float(said))
            <= (1.01 * 10.0 ** -len(said.partition(".")[2]) if "." in said else 0)
            for seen, said in zip(found.groups(), numbers, strict=True)
        ]
        if all(close):
            return True
    return False


class Walk:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.store = f"sqlite:///{folder / 'mlflow.db'}"
        self.runs: dict[int, str] = {}
        self.outputs: list[tuple[int, str, str]] = []

    def run(self, number: int, line: str) -> None:
        for earlier, run_id in self.runs.items():
            line = line.replace(f"<run {earlier}>", run_id[:8])
        assert "<run" not in line, f"command {number} names a run no earlier command made: {line}"
        arguments = shlex.split(line, comments=True)[1:]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(arguments)
        self.outputs.append((code, out.getvalue(), err.getvalue()))
        made = re.search(r"^MLflow run ([0-9a-f]{32}) in experiment", out.getvalue(), flags=re.M)
        if made:
            self.runs[number] = made.group(1)

    def artifact(self, run: int, name: str) -> Path:
        return artifact(self.store, self.runs[run], name, self.folder / "downloads" / str(run))


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Walk:
    folder = tmp_path_factory.mktemp("walkthrough")
    walked = Walk(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # a clean folder: the demo writes configs/, demo/ and mlflow.db here
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setenv("SHAPLINE_CACHE_DIR", str(folder / "shard-cache"))
        for number, line in enumerate(walkthrough(), start=1):
            walked.run(number, line)
    return walked


def test_the_walkthrough_runs_as_written_and_shows_what_the_page_says(walk: Walk) -> None:
    assert len(walk.outputs) == 6 and [code for code, _, _ in walk.outputs] == [0] * 6, walk.outputs
    first = walk.runs[1]
    (_, out1, _), (_, pinned, _), (_, out3, _), (_, out4, _), (_, out5, _), (_, compared, _) = walk.outputs
    no_reference = "no comparison: penguins-species has no reference run in this experiment yet"
    assert said_on_the_page(no_reference) and no_reference in out1
    assert (
        f"run {first} (penguins-species · " in pinned and "is the reference of penguins-species now" in pinned
    )
    held = "no attribution drift: NDCG 0.953 >= 0.90"
    assert said_on_the_page(held) and shows(f"{held} against run {first}\n", out3)
    moved = f"attribution drift: NDCG 0.953 >= 0.90 against run <run 1>; importance changed by more than 90%: island ({MINUS}100%)"
    assert said_on_the_page(moved) and shows(moved.replace("<run 1>", first) + "\n", out4)
    stricter = "attribution drift: NDCG 0.953 < 0.99 against run <run 1>"
    assert said_on_the_page(stricter) and shows(stricter.replace("<run 1>", first) + "\n", out5)
    assert f"run {walk.runs[3]} against run {first} (baseline)" in compared
    assert "same rows (by penguin_id): 124 in both" in compared and said_on_the_page(
        "the 124 birds both runs"
    )


def test_the_dream_runs_report_names_the_reference_and_the_movers_the_page_quotes(walk: Walk) -> None:
    html = walk.artifact(3, "report.html").read_text()
    movers = f"island ({MINUS}0.86), bill_length_mm (+0.78), body_mass_g ({MINUS}0.57)"
    assert shows(f"Top movers: {movers}", html)
    assert said_on_the_page(
        f"`island` ({MINUS}0.86: one island, so it explains nothing), `bill_length_mm` (+0.78)"
    )
    assert (
        f">run {walk.runs[1]}</a>" in html
        and "the model&#x27;s reference, pinned with shapline reference" in html
    )
    assert "<dt>rows explained</dt><dd>344</dd>" in html and "demo/penguins.csv" in html
    assert said_on_the_page("the reference that explained 344 rows of `demo/penguins.csv`")


def test_categories_say_what_each_island_does_in_the_table_the_plot_and_the_report(walk: Walk) -> None:
    table = pd.read_csv(walk.artifact(1, "categories.csv"))
    assert list(table.columns) == ["feature", "category", "count", "mean_shap_value"]
    island = table[table["feature"] == "island"].set_index("category")
    assert island["count"].to_dict() == {"Dream": 124, "Torgersen": 52, "Biscoe": 168}
    assert island["mean_shap_value"].is_monotonic_decreasing  # the push towards Chinstrap first
    assert shows("+0.91", f"{island.loc['Dream', 'mean_shap_value']:+.2f}")
    assert shows("-0.90", f"{island.loc['Biscoe', 'mean_shap_value']:+.2f}")
    assert said_on_the_page(
        f"`island = Dream` pushes towards Chinstrap (+0.91 log-odds over 124 birds) and Biscoe away ({MINUS}0.90)"
    )
    sex = table[table["feature"] == "sex"]
    assert set(sex["category"]) == {"female", "male", "(missing)"} and sex["count"].sum() == 344
    # The mean SHAP value of island over the Dream birds, computed here from the values table.
    values = pd.read_parquet(walk.artifact(1, "shap_values.parquet"))
    data = pd.read_csv(walk.folder / "demo" / "penguins.csv", dtype={"penguin_id": str})
    dream = values["penguin_id"].isin(data.loc[data["island"] == "Dream", "penguin_id"])
    assert island.loc["Dream", "mean_shap_value"] == pytest.approx(
        values.loc[dream, "island"].mean(), abs=1e-12
    )
    assert walk.artifact(1, "plots/categories.png").stat().st_size > 10_000
    html = walk.artifact(1, "report.html").read_text()
    assert 'alt="mean SHAP value per category"' in html and "<td>Dream</td>" in html


def test_examples_on_both_sides_are_named_by_the_id_and_all_shown_in_the_report(walk: Walk) -> None:
    client = MlflowClient(walk.store)
    files = sorted(Path(f.path).name for f in client.list_artifacts(walk.runs[1], "plots"))
    waterfalls = [name for name in files if name.startswith("waterfall_")]
    assert len(waterfalls) == 15 and all(re.fullmatch(r"waterfall_P\d{3}\.png", name) for name in waterfalls)
    values = pd.read_parquet(walk.artifact(1, "shap_values.parquet")).set_index("penguin_id")["model_output"]
    named = [name.removeprefix("waterfall_").removesuffix(".png") for name in waterfalls]
    highest = set(values.sort_values(ascending=False, kind="stable").index[:5])
    lowest = set(values.sort_values(kind="stable").index[:5])
    nearest = set(values.abs().sort_values(kind="stable").index[:5])  # log-odds 0 is P = 0.5
    assert set(named) == highest | lowest | nearest
    assert max(values[list(lowest)]) < 0 < min(values[list(highest)])
    html = walk.artifact(1, "report.html").read_text()
    for group in ("highest model output", "lowest model output", "nearest the decision threshold"):
        assert f"<h3>The rows with the {group}</h3>" in html
    assert len(re.findall(r'<img alt="waterfall_P\d{3}"', html)) == 15


def test_the_description_and_the_prefect_artifact_say_what_was_explained_and_link_the_run(walk: Walk) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    run = MlflowClient(walk.store).get_run(walk.runs[1])
    note = run.data.tags["mlflow.note.content"]
    assert "validation passed, 14 expectations: 3 from the config, 11 shapline's own" in note
    assert (
        f"[report.html](#/experiments/{run.info.experiment_id}/runs/{walk.runs[1]}/artifacts/report.html)"
        in note
    )
    page = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{walk.runs[1]}"
    assert f"(then {page}?workflowType=machine_learning)" in walk.outputs[0][1]
    with get_client(sync_client=True) as client:
        [summary] = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.data.tags["prefect.flow_run_id"]])
            )
        )
    markdown: Any = summary.data
    assert "Explained: **probability of Chinstrap, SHAP values in log-odds**." in markdown
    assert f"open [the run]({page}?workflowType=machine_learning)" in markdown
    assert f"start `mlflow ui --backend-store-uri sqlite:///{walk.folder / 'mlflow.db'}`" in markdown


def test_runs_leave_nothing_in_the_shard_cache(walk: Walk) -> None:
    cache = walk.folder / "shard-cache"
    assert not cache.exists() or list(cache.iterdir()) == []


@pytest.mark.parametrize(
    ("quote", "text", "said"),
    [
        ("NDCG 0.953 >= 0.90", "NDCG 0.953 >= 0.90", True),
        ("NDCG 0.953 >= 0.90", "NDCG 0.954 >= 0.90", True),  # the last digit of a measurement
        ("NDCG 0.953 >= 0.90", "NDCG 0.955 >= 0.90", False),
        ("NDCG 0.953 >= 0.90", "NDCG 0.953 < 0.90", False),  # the words never
        ("more than 90%: island (-100%)", "more than 91%: island (-100%)", False),  # nor a whole number
    ],
)
def test_a_quote_is_shown_with_its_last_digit_measured(quote: str, text: str, said: bool) -> None:
    assert shows(quote, text) is said
