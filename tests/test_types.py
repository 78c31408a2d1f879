"""mypy on flows/ and tasks/ as they are installed (shapline.flows, shapline.tasks), at pyproject's strictness."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_package_type_checks(tmp_path: Path) -> None:
    # mypy finds modules by folder; the installed names map folders (package-dir), so it checks a tree of
    # links laid out the way the wheel installs them.
    tree = tmp_path / "shapline"
    tree.mkdir()
    for item in (ROOT / "shapline").iterdir():
        if item.name != "__pycache__":
            (tree / item.name).symlink_to(item)
    (tree / "flows").symlink_to(ROOT / "flows")
    (tree / "tasks").symlink_to(ROOT / "tasks")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            "-p",
            "shapline",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
