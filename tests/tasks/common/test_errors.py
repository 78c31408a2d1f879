"""Errors a user acts on: a full disk is named by the folder that filled and the setting that moves it."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from shapline.tasks.common import errors
from shapline.tasks.common.errors import disk_full, out_of_space


def test_a_write_that_found_no_space_names_its_folder_by_the_failed_path(tmp_path: Path) -> None:
    scratch, store = tmp_path / "scratch", tmp_path / "store"
    failed = OSError(errno.ENOSPC, "No space left on device", str(store / "shard-000001.parquet"))
    wrapped = RuntimeError("shard 1 failed")
    wrapped.__cause__ = failed
    assert out_of_space(wrapped)
    error = disk_full(
        wrapped, {"the run's scratch folder (TMPDIR)": scratch, "the shard store (shards.cache_dir)": store}
    )
    assert error is not None
    assert str(error).startswith(f"no space left on device: the shard store (shards.cache_dir): {store} (")
    assert "TMPDIR" not in str(error)


def test_without_a_path_the_folder_with_no_space_left_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full, roomy = tmp_path / "full", tmp_path / "roomy"
    monkeypatch.setattr(errors, "_free_bytes", lambda folder: 0 if folder == full else 10 << 30)
    arrow = OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")
    error = disk_full(arrow, {"scratch (TMPDIR)": full, "store (shards.cache_dir)": roomy})
    assert error is not None and "scratch (TMPDIR)" in str(error) and "store" not in str(error)


def test_other_errors_are_not_a_full_disk() -> None:
    assert not out_of_space(OSError(errno.EACCES, "Permission denied"))
    assert disk_full(ValueError("x"), {"a": Path("/")}) is None
