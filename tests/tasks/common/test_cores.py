"""Cores are the ones the process may use: its CPU affinity and its cgroup's CPU quota, not the machine's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from shapline.tasks.common.cores import cgroup_cpu_quota

REPORT = (
    "import json; from shapline.tasks.common.cores import usable_cores, threads_per_worker;"
    "from shapline.tasks.models.loading import load_predictor; from shapline.tasks.common.config import XGBoostModel;"
    "import sys; p = load_predictor(XGBoostModel(kind='xgboost', name='m', path=sys.argv[1]));"
    "p.limit_threads(threads_per_worker('thread', 1)); m = p.native;"
    "print(json.dumps({'cores': usable_cores(), 'threads': threads_per_worker('thread', 1),"
    " 'xgboost_n_jobs': m.get_params()['n_jobs'] if hasattr(m, 'get_params') else None}))"
)


def _report(prefix: list[str], model: Path) -> dict[str, int]:
    import json

    done = subprocess.run(
        [*prefix, sys.executable, "-c", REPORT, str(model)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_pinned_to_one_core_a_worker_gets_one_thread(xgb_model: Path) -> None:
    """Pinned with taskset to one core on a machine with more, a worker and its XGBoost get one thread."""
    assert (os.cpu_count() or 1) >= 2, "this test needs a machine with two cores or more"
    pinned = _report(["taskset", "-c", "0"], xgb_model)
    assert pinned == {"cores": 1, "threads": 1, "xgboost_n_jobs": 1}
    free = _report([], xgb_model)
    assert free["cores"] == len(os.sched_getaffinity(0)) and free["xgboost_n_jobs"] == free["threads"]


def _writable_cpu_cgroup() -> Path | None:
    """A cgroup v1 cpu hierarchy this process may create a child in (root on Linux), else None."""
    for mount in (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpu,cpuacct")):
        if (mount / "cpu.cfs_quota_us").exists() and os.access(mount, os.W_OK):
            return mount
    return None


def test_a_cgroup_quota_of_one_cpu_is_one_core(xgb_model: Path) -> None:
    """A process in a cgroup limited to one CPU (a Kubernetes pod with `cpu: 1`) counts one core, on a real
    cgroup where one can be made, and through the same reader on a cgroup tree laid out in a folder."""
    mount = _writable_cpu_cgroup()
    if mount is None:
        pytest.fail("no writable cgroup v1 cpu hierarchy here (run as root on Linux)")
    group = mount / f"shapline-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cpu.cfs_quota_us").write_text("100000")  # one CPU per 100 ms period
        enter = ["sh", "-c", f'echo $$ > {group}/tasks && exec "$@"', "sh"]
        limited = _report(enter, xgb_model)
        assert limited == {"cores": 1, "threads": 1, "xgboost_n_jobs": 1}
    finally:
        group.rmdir()


def test_the_quota_is_read_in_v1_and_v2_layouts_and_the_smallest_wins(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    (v2 / "pod" / "worker").mkdir(parents=True)
    (v2 / "pod" / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs for the pod
    (v2 / "pod" / "worker" / "cpu.max").write_text("max 100000\n")  # no limit of its own
    proc = tmp_path / "cgroup-v2"
    proc.write_text("0::/pod/worker\n")
    assert cgroup_cpu_quota(str(proc), str(v2)) == pytest.approx(1.5)
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "a" / "b").mkdir(parents=True)
    for folder, quota in ((v1 / "cpu,cpuacct" / "a", "300000"), (v1 / "cpu,cpuacct" / "a" / "b", "-1")):
        (folder / "cpu.cfs_quota_us").write_text(quota)
        (folder / "cpu.cfs_period_us").write_text("100000")
    proc = tmp_path / "cgroup-v1"
    proc.write_text("2:cpu,cpuacct:/a/b\n1:memory:/a\n")
    assert cgroup_cpu_quota(str(proc), str(v1)) == pytest.approx(3.0)
    proc.write_text("1:memory:/\n")
    assert cgroup_cpu_quota(str(proc), str(v1)) is None


def test_omp_num_threads_caps_the_threads_of_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A user who set OMP_NUM_THREADS=1 (like-for-like benchmarks, a shared host) keeps one native thread."""
    from shapline.tasks.common.cores import threads_per_worker, usable_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads_per_worker("thread", 1) == usable_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads_per_worker("thread", 1) == 1 and threads_per_worker("process", 2) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert threads_per_worker("thread", 1) == usable_cores()
