"""The demo on a busy machine: a temporary Prefect server that needs more than Prefect's 20 s still starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import own_server_env

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
# Busy processes for the duration of the demo (each stops by itself after this long, whatever happens).
BUSY_PROCESSES = 4
BUSY_SECONDS = 240


@pytest.fixture
def busy_machine() -> Iterator[None]:
    """Real CPU load: more spinning processes than cores, bounded in time."""
    spin = f"import time\nend = time.time() + {BUSY_SECONDS}\nwhile time.time() < end: pass\n"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(BUSY_PROCESSES)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def demo_env(tmp_path: Path) -> dict[str, str]:
    return {
        **own_server_env(tmp_path, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "SHAPLINE_CACHE_DIR": str(tmp_path / "cache"),
    }


def run_demo(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "configs" / "penguins.yaml"
    config.parent.mkdir(exist_ok=True)
    shutil.copy(REPO / "configs" / "penguins.yaml", config)
    command = [
        str(BIN / "shapline"),
        "demo",
        "--config",
        str(config),
        "--set",
        "data.explain_rows=20",
        "--set",
        "output.plots=[bar]",
        "--json",
    ]
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_the_demo_finishes_on_a_machine_busier_than_its_cores(busy_machine: None, tmp_path: Path) -> None:
    started = time.monotonic()
    done = run_demo(tmp_path, demo_env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "FINISHED" and summary["rows_explained"] == 20
    print(f"demo under load: {time.monotonic() - started:.0f} s, load average {os.getloadavg()}")


def test_a_server_that_never_starts_says_what_to_do(tmp_path: Path) -> None:
    """The user's own (too short) timeout is respected, and the one line says how to get past it."""
    env = {**demo_env(tmp_path), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}
    done = run_demo(tmp_path, env)
    errors = [line for line in done.stderr.splitlines() if line.startswith("shapline: error:")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr[-3000:]
    assert "did not start within 1 s" in errors[0]
    assert "prefect server start" in errors[0] and "PREFECT_API_URL" in errors[0]
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in errors[0]
    assert json.loads(done.stdout.strip().splitlines()[-1])["status"] == "FAILED"
