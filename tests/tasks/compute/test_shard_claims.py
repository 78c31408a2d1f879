"""A run's claim on a shard store leaves nothing behind: the last run out of an empty store removes it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from shapline.tasks.compute.shards import ShardStoreClaim


def test_a_run_that_finishes_leaves_no_lock_no_claims_and_no_folder(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    claim = ShardStoreClaim(store, "run-a")
    (store / "shard-000000-abc.parquet").write_bytes(b"finished")
    assert claim.release(delete=True)
    assert not store.exists() and list(tmp_path.iterdir()) == []


def test_a_failed_run_before_any_shard_leaves_nothing_either(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    with ShardStoreClaim(store, "run-b"):
        pass  # released without delete, as a failed run is: nothing to keep
    assert not store.exists()


def test_a_store_with_shards_to_resume_or_another_live_run_stays(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "shard-000000-abc.parquet").write_bytes(b"finished")
    with ShardStoreClaim(store, "run-c"):
        pass
    assert (store / "shard-000000-abc.parquet").exists() and (store / ".lock").exists()
    first, second = ShardStoreClaim(store, "run-d"), ShardStoreClaim(store, "run-e")
    assert not first.release(delete=True) and (store / ".claims" / "run-e").exists()
    assert second.release(delete=True) and not store.exists()


def _open_count(path: Path) -> int:
    """How many of this process's file descriptors are open on `path`."""
    count = 0
    for descriptor in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{descriptor}") == str(path)
        except OSError:
            continue
    return count


def test_a_run_waiting_on_the_lock_of_a_store_being_removed_takes_it_again(tmp_path: Path) -> None:
    """The last run out removes `.lock` while holding it; one that opened it and waits must not take a lock
    on a file no longer there (two runs would then both hold "the" lock), nor write into a removed folder."""
    store = tmp_path / "store"
    store.mkdir()
    leaving = ShardStoreClaim(store, "leaving")
    arrived: list[ShardStoreClaim] = []
    with leaving._locked():
        waiter = threading.Thread(target=lambda: arrived.append(ShardStoreClaim(store, "arriving")))
        waiter.start()
        deadline = time.monotonic() + 10
        while _open_count(store / ".lock") < 2:  # the arriving run opened the lock file and waits on it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        leaving.path.unlink()
        leaving._remove_if_empty()
        assert not store.exists()
    leaving.released = True
    waiter.join(timeout=10)
    [arriving] = arrived
    assert (store / ".claims" / "arriving").is_file() and (store / ".lock").is_file()
    assert arriving.release(delete=True) and not store.exists()
