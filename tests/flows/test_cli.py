"""The `shapline` command's own behaviour: --debug wherever it is given, one line without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shapline.flows.cli import main
from shapline.tasks.common.errors import ConfigError

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize(
    "argv",
    [
        ["--debug", "validate", str(CONFIGS / "invalid_yaml.yaml")],
        ["validate", str(CONFIGS / "invalid_yaml.yaml"), "--debug"],
    ],
)
def test_debug_before_or_after_the_command_shows_the_error_with_its_cause(argv: list[str]) -> None:
    with pytest.raises(ConfigError, match="not valid YAML") as caught:
        main(argv)
    assert isinstance(caught.value.__cause__, yaml.YAMLError)


def test_without_debug_the_same_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(CONFIGS / "invalid_yaml.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("shapline: error:") and "Traceback" not in err


def test_importing_the_plots_leaves_a_notebooks_matplotlib_backend_alone() -> None:
    probe = (
        "import matplotlib; matplotlib.use('svg'); import shapline.tasks.results.plots, shapline.flows.explain; "
        "print(matplotlib.get_backend())"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "svg"


def test_python_dash_m_shapline_is_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "shapline", "schema"], capture_output=True, text=True, check=True
    )
    assert '"model"' in done.stdout
