"""The `shapline` command's own behaviour: --debug wherever it is given, one line without it."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from shapline.flows.cli import main
from shapline.tasks.common.errors import ConfigError
from tests.helpers import own_server_env

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


def _actions(parser: argparse.ArgumentParser, path: str = "shapline") -> list[tuple[str, argparse.Action]]:
    """Every argument of the command and of its subcommands, with where it is."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += [(f"{path} {command.dest}", command) for command in action._choices_actions]
            for name, sub in action.choices.items():
                found += _actions(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            found.append((path, action))
    return found


def test_every_argument_of_every_command_says_what_it_is() -> None:
    from shapline.flows.cli import _parser

    arguments = _actions(_parser())
    assert len(arguments) > 45  # the commands too
    silent = [f"{path} {action.dest}" for path, action in arguments if not action.help]
    assert silent == []


@pytest.mark.parametrize("command", ["run", "validate", "demo", "deploy", "serve"])
def test_commands_that_read_a_config_take_set_like_run(command: str) -> None:
    from shapline.flows.cli import _parser

    parsed = _parser().parse_args([command, *(["x.yaml"] if command != "demo" else []), "--set", "a.b=1"])
    assert parsed.overrides == ["a.b=1"]


def test_validate_says_what_run_would_explain_in_the_words_of_every_other_place(
    write_config: Any, penguins: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data, model = penguins
    config = write_config(
        model={"name": "p", "kind": "sklearn", "path": str(model)},
        data={"source": str(data), "target": "species", "explain_rows": 1000},
        validation={"expectations": [{"expect_column_values_to_not_be_null": {"column": "species"}}]},
        background={"size": 10},
        explainer={"algorithm": "kernel"},
    )
    for command in (["validate", str(config)], ["run", str(config), "--dry-run"]):
        assert main(command) == 0
        out = capsys.readouterr().out
        assert "explainer kernel: probability of Chinstrap, SHAP values in log-odds" in out
        assert "logit space" not in out
        # 7 features present and rows: shapline's own; one from the config.
        assert "validation: 9 expectations: 1 from the config, 8 shapline's own (every feature present" in out
        assert "data.explain_rows 1000 is more than the 344 rows of the data: the run explains all 344" in out


def test_features_that_leave_out_a_column_the_model_needs_name_it(
    write_config: Any, penguins: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to say "text in island": the probe blamed a row for the columns the config left out."""
    data, model = penguins
    config = write_config(
        model={"name": "p", "kind": "sklearn", "path": str(model)},
        data={"source": str(data), "target": "species", "features": ["bill_length_mm", "bill_depth_mm"]},
    )
    assert main(["validate", str(config)]) == 1
    err = capsys.readouterr().err
    assert err == (
        "shapline: error: data.features leaves out island, flipper_length_mm, body_mass_g, sex, year, which the "
        "model needs; the model's features, in order: island, bill_length_mm, bill_depth_mm, flipper_length_mm, "
        "body_mass_g, sex, year (or leave data.features out)\n"
    )


def test_a_runs_temporary_prefect_server_records_task_runs_in_batches_unless_told_otherwise() -> None:
    """In a fresh process, once the CLI is imported, Prefect's settings (what the temporary server `shapline
    run` starts reads) say batches of 100 flushed every 5 s; a value the user set is kept."""
    script = (
        "import shapline.flows.cli\n"
        "from prefect.settings import get_current_settings\n"
        "recorder = get_current_settings().server.services.task_run_recorder\n"
        "print(recorder.batch_size, recorder.flush_interval)\n"
    )
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_")
    }
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == ["100", "5.0"]
    environment["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"] = "7"
    kept = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.split() == ["7", "5.0"]


# In a fresh process without PREFECT_API_URL: the niceness of the temporary server's threads (once the
# flow's client is on that server), or "not started" when the CLI leaves the server to the flow's first call.
SERVER_NICENESS = """
import os
from prefect.client.orchestration import get_client
from prefect.server.api.server import SubprocessASGIServer
from shapline.flows.cli import _generous_server_start

def niceness(pid):  # the kernel's own account of each thread's (field 19 of its stat), by thread id
    task = f"/proc/{pid}/task"
    return {t: int(open(f"{task}/{t}/stat").read().rsplit(")", 1)[1].split()[16]) for t in os.listdir(task)}

with _generous_server_start():
    server = SubprocessASGIServer()
    if server.server_process is None:
        print("not started")
    else:
        with get_client(sync_client=True) as client:
            assert str(client.api_url).rstrip("/") == server.api_url, (client.api_url, server.api_url)
            assert client.api_healthcheck() is None
        print(*sorted(set(niceness(server.server_process.pid).values())))
"""


def _temporary_server_niceness(tmp_path: Path, niceness: str | None) -> str:
    environment = own_server_env(tmp_path, "SHAPLINE_SERVER_NICENESS")
    if niceness is not None:
        environment["SHAPLINE_SERVER_NICENESS"] = niceness
    found = subprocess.run(
        [sys.executable, "-c", SERVER_NICENESS], capture_output=True, text=True, env=environment, timeout=600
    )
    assert found.returncode == 0, found.stderr[-3000:]
    return found.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads' niceness: Linux")
def test_the_temporary_server_runs_at_the_niceness_asked_for_and_is_left_to_prefect_otherwise(
    tmp_path: Path,
) -> None:
    assert _temporary_server_niceness(tmp_path, "11") == "11"
    assert _temporary_server_niceness(tmp_path, None) == "not started"
    assert _temporary_server_niceness(tmp_path, "0") == "not started"


@pytest.mark.parametrize("value", ["fast", "20", "-1", "1.5"])
def test_a_server_niceness_that_is_not_0_to_19_is_one_line(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SHAPLINE_SERVER_NICENESS", value)
    assert main(["run", str(CONFIGS / "valid.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"shapline: error: SHAPLINE_SERVER_NICENESS: expected a whole number from 0 to 19, got {value!r}\n"
    )
