from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from flows.config import OutputConfig
from tasks.explain import ShardValues
from tasks.plots import render_plots


def values_and_rows(labels: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    rows = pd.DataFrame({"mins": rng.normal(size=30), "state": rng.choice(["KS", "OH", None], size=30)})
    values = rng.normal(size=(30, 2, len(labels)))
    shard = ShardValues(
        row_ids=np.arange(30),
        features=["mins", "state"],
        labels=labels,
        values=values,
        base_values=np.zeros((30, len(labels))),
        model_output=values.sum(axis=1),
        algorithm="kernel",
        link="logit",
    )
    return shard.to_frame(), rows


def test_single_output_plots_have_the_contract_names(tmp_path: Path) -> None:
    values, rows = values_and_rows(["1"])
    written = render_plots(values, rows, ["mins", "state"], ["1"], OutputConfig(top_k=3), tmp_path)
    names = sorted(p.name for p in written)
    top = values.sort_values("model_output", ascending=False)["row_id"].head(3)
    assert names == sorted(["bar.png", "beeswarm.png", "force.html", *[f"waterfall_{i}.png" for i in top]])
    assert all(p.stat().st_size > 1000 for p in written)
    assert "<html>" in (tmp_path / "force.html").read_text().lower()


def test_several_classes_get_one_file_per_class(tmp_path: Path) -> None:
    values, rows = values_and_rows(["no", "yes"])
    written = {
        p.name
        for p in render_plots(
            values,
            rows,
            ["mins", "state"],
            ["no", "yes"],
            OutputConfig(top_k=1, plots=["bar", "beeswarm", "force"]),
            tmp_path,
        )
    }
    assert written == {"bar.png", "beeswarm_no.png", "beeswarm_yes.png", "force_no.html", "force_yes.html"}
