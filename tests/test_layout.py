"""The house rules a newcomer relies on: layers point one way, no import cycles, one installed name."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The folders of the checkout and the packages they install as.
PACKAGES = {"shapline": ROOT / "shapline", "shapline.flows": ROOT / "flows", "shapline.tasks": ROOT / "tasks"}


def modules() -> dict[str, Path]:
    """Every project module by its installed name."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join([package, *parts])
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports, at the top or inside functions (a lazy import is still a dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in known}
    return found


def graph() -> dict[str, set[str]]:
    every = modules()
    return {name: imports(path, set(every)) - {name} for name, path in every.items()}


def test_nothing_under_tasks_imports_flows() -> None:
    upward = {
        module: sorted(d for d in deps if d.startswith("shapline.flows"))
        for module, deps in graph().items()
        if module.startswith("shapline.tasks")
    }
    assert not {m: d for m, d in upward.items() if d}


# shapline.tasks' rooms, bottom first: each may import only itself and the rooms before it.
LAYERS = ["common", "tracking", "data", "models", "explainers", "compute", "monitoring", "results", "run"]
# Which rooms may import each outside library that is heavy or talks to a service (anywhere in the module,
# a lazy import included): a worker that computes shards loads none of them unless its model needs it.
LIBRARIES = {
    "mlflow": {"tracking", "models", "monitoring", "run"},
    "boto3": {"data", "models"},
    "botocore": {"data", "models"},
    "prefect": set(),  # tasks are plain functions; their Prefect tasks are declared in flows/
    "matplotlib": {"results"},
    "great_expectations": {"data"},
    "distributed": {"models", "compute"},
}


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["shapline", "tasks"] else None


def test_each_room_imports_only_the_rooms_below_it() -> None:
    upward = []
    for module, deps in graph().items():
        mine = room(module)
        if mine is None:
            continue
        for dep in deps:
            theirs = room(dep)
            if theirs is not None and LAYERS.index(theirs) > LAYERS.index(mine):
                upward.append(f"{module} ({mine}) imports {dep} ({theirs})")
    assert not upward, upward
    folders = {p.name for p in (ROOT / "tasks").iterdir() if (p / "__init__.py").exists()}
    assert folders == set(LAYERS), "a new room needs its place in LAYERS"
    assert not [p.name for p in (ROOT / "tasks").glob("*.py") if p.name != "__init__.py"], (
        "every module has a room"
    )


def outside_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_each_outside_library_is_imported_only_by_its_rooms() -> None:
    wrong = []
    for module, path in modules().items():
        mine = room(module)
        if mine is None:
            continue
        for library in outside_imports(path) & set(LIBRARIES):
            if mine not in LIBRARIES[library]:
                wrong.append(f"{module} ({mine}) imports {library}")
    assert not wrong, wrong


def test_the_config_is_the_bottom_layer() -> None:
    deps = graph()["shapline.tasks.common.config"]
    assert deps <= {"shapline.tasks.common.errors", "shapline.tasks.common.redact"}, deps


def test_there_is_no_import_cycle_among_the_modules() -> None:
    edges = graph()
    # A package's __init__ re-exports its modules; those edges are the public API, not dependencies.
    for package in PACKAGES:
        edges[package] = set()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle.extend([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, [*path, nxt]):
                return True
        state[node] = 2
        return False

    for start in sorted(edges):
        if state.get(start) is None and visit(start, [start]):
            break
    assert not cycle, " -> ".join(cycle)


def build_wheel(folder: Path) -> Path:
    """A wheel of the checkout, built as `pip install .` builds one."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(folder), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [wheel] = folder.glob("shapline-*.whl")
    return wheel


@pytest.mark.slow
def test_a_wheel_installs_one_top_level_name_and_the_demo_config(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert top_level == {"shapline"}, top_level
    assert "shapline/configs/penguins.yaml" in names
    assert "shapline/testing/endpoint.py" in names
    assert "shapline/flows/explain.py" in names and "shapline/tasks/common/config.py" in names
    assert "shapline/tasks/models/sagemaker/endpoint.py" in names


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_the_installed_wheel_runs_the_demo_and_deploys_from_a_folder_that_is_not_the_checkout(
    tmp_path: Path,
) -> None:
    """No checkout on the path: shapline from its wheel (its dependencies borrowed from this venv)."""
    import json
    import os
    import sysconfig

    from prefect.settings import PREFECT_API_URL

    wheel = build_wheel(tmp_path / "wheels")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    # The dependencies, not shapline: a path line in a .pth adds the folder but runs none of its .pth files,
    # so this venv's editable finder for the checkout stays out.
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "SHAPLINE_CACHE_DIR": str(work / "cache"),
        "PYTHONPATH": "",
    }
    python = str(venv / "bin" / "python")
    where = subprocess.run(
        [
            python,
            "-c",
            "import shapline, importlib.util as u; print(shapline.__file__, u.find_spec('tasks'), u.find_spec('flows'))",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(site) in where.stdout and where.stdout.split()[1:] == ["None", "None"], where.stdout
    demo = subprocess.run(
        [
            python,
            "-m",
            "shapline",
            "demo",
            "--set",
            "data.explain_rows=10",
            "--set",
            "output.plots=[bar]",
            "--json",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert json.loads(demo.stdout.strip().splitlines()[-1])["status"] == "FINISHED"
    assert (work / "configs" / "penguins.yaml").is_file() and (work / "demo" / "penguins.csv").is_file()
    deployed = subprocess.run(
        [str(venv / "bin" / "shapline"), "deploy", "configs/penguins.yaml", "--pool", "wheel-pool", "--json"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    assert "ignore_warnings" not in deployed.stdout + deployed.stderr
    [deployment_id] = json.loads(deployed.stdout.strip().splitlines()[-1])["deployments"].values()
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
    assert deployment.entrypoint == "shapline.flows.explain.explain_model"
    assert not deployment.pull_steps and "site-packages" not in json.dumps(deployment.model_dump(mode="json"))
