"""Staged rows: each shard's rows come back exactly as validated, and the plan lets go of the data."""

from __future__ import annotations

import contextlib
import gc
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shapline.tasks.common.config import load_config
from shapline.tasks.compute.memory import collections_see_only_this_run
from shapline.tasks.compute.plan import check_data, plan_run
from shapline.tasks.compute.shards import plan_shards
from shapline.tasks.compute.staging import stage_rows


def _mixed_rows() -> pd.DataFrame:
    """Text with missing values, floats with NaN, ints, nullable ints, booleans and a category, by row_id."""
    from palmerpenguins import load_penguins

    frame = load_penguins()
    frame["island_code"] = pd.Categorical(frame["island"])
    frame["tagged"] = frame["year"] % 2 == 0
    frame["rings"] = pd.array([1, None] * (len(frame) // 2), dtype="Int64")
    frame.index.name = "row_id"
    return frame.iloc[::3]  # row ids with gaps, as a sample of the data has


def test_each_shard_comes_back_as_it_was_staged(tmp_path: Path) -> None:
    rows = _mixed_rows()
    shards = plan_shards(rows.index.to_numpy(), 17)
    staged = stage_rows(rows, shards, tmp_path / "rows")
    for shard in shards:
        expected = rows.iloc[shard.start : shard.start + len(shard.row_ids)]
        pd.testing.assert_frame_equal(staged.shard_rows(shard), expected, check_exact=True)
    assert len(list((tmp_path / "rows").iterdir())) == len(shards)


def test_take_reads_rows_by_id_in_the_order_asked(tmp_path: Path) -> None:
    rows = _mixed_rows()
    staged = stage_rows(rows, plan_shards(rows.index.to_numpy(), 10), tmp_path)
    wanted = rows.index.to_numpy()[[40, 3, 77, 0, 41]]
    pd.testing.assert_frame_equal(staged.take(wanted), rows.loc[wanted], check_exact=True)
    assert staged.take(np.empty(0, dtype=np.int64)).empty
    with pytest.raises(KeyError, match="not staged"):
        staged.take([1])  # row 1 is not among every third row


@pytest.mark.parametrize("in_a_run", [False, True])
def test_the_plan_lets_go_of_the_data_once_its_rows_are_staged(
    tmp_path: Path, xgb_model: Path, cancer_data: Path, write_config: object, in_a_run: bool
) -> None:
    """What the flow does before the shards start: nothing it keeps still refers to the data's rows, not even
    a small slice (a slice of a column is a view that keeps the whole column: the probe rows did); and so
    inside a run's collections_see_only_this_run(), as the flow calls it."""
    with collections_see_only_this_run() if in_a_run else contextlib.nullcontext():
        _stage_and_release(tmp_path, xgb_model, cancer_data, write_config)


def test_collections_in_a_run_see_its_own_objects_and_the_heap_comes_back_after() -> None:
    class Node:
        other: object = None

    before = gc.get_freeze_count()
    with collections_see_only_this_run():
        frozen = gc.get_freeze_count()
        assert frozen > before
        with collections_see_only_this_run():  # a nested block (a subflow) leaves the outer one's set aside
            pass
        assert gc.get_freeze_count() >= frozen
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle made inside the run: a collection still finds it
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
    assert gc.get_freeze_count() == before == 0


def test_a_heap_the_process_froze_itself_stays_frozen() -> None:
    """Told by objects, not by gc.get_freeze_count(): a frozen object freed meanwhile by another thread
    of the test process (a server of an earlier test) lowers the count (seen once in CI)."""
    host_object = [object()]
    gc.freeze()  # as a pre-fork server does
    try:
        run_object = [object()]
        with collections_see_only_this_run():
            # Nothing the host froze is handed back, and nothing more is set aside.
            assert not _collected(host_object) and _collected(run_object)
        assert not _collected(host_object) and _collected(run_object)
    finally:
        gc.unfreeze()


def _collected(thing: object) -> bool:
    """Whether a garbage collection would look at `thing` (gc.get_objects() leaves out frozen objects)."""
    return any(candidate is thing for candidate in gc.get_objects())


def _stage_and_release(tmp_path: Path, xgb_model: Path, cancer_data: Path, write_config: object) -> None:
    import pyarrow as pa

    from shapline.tasks.compute.memory import return_freed_memory

    data = pd.read_csv(cancer_data)
    big = data.sample(200_000, replace=True, random_state=0).reset_index(drop=True)
    big.to_parquet(tmp_path / "big.parquet")  # 200,000 x 9 floats, read by Arrow: 14 MB in its pool
    config_path = write_config(  # type: ignore[operator]
        model={"name": "x", "kind": "xgboost", "path": str(xgb_model)},
        data={"source": str(tmp_path / "big.parquet"), "target": "malignant"},
        explainer={"algorithm": "tree"},
        shards={"size": 50_000},
    )
    config = load_config(config_path)
    check = check_data(config)
    plan = plan_run(config, check)
    frame, rows = weakref.ref(check.data.frame), weakref.ref(plan.rows)
    expected = plan.rows.copy()
    assert pa.total_allocated_bytes() > 10_000_000
    staged = stage_rows(plan.rows, plan.shards, tmp_path / "rows")
    released_check, released_plan = check.without_frame(), plan.without_rows()
    del check, plan
    return_freed_memory()
    assert frame() is None and rows() is None
    assert pa.total_allocated_bytes() < 1_000_000
    assert released_check.data.rows == 200_000 and released_plan.explain_rows == 200_000
    assert list(released_plan.rows.columns) == list(expected.columns) and released_plan.rows.empty
    back = pd.concat([staged.shard_rows(s) for s in released_plan.shards])
    pd.testing.assert_frame_equal(back, expected, check_exact=True)
