from __future__ import annotations

from pathlib import Path

import yaml

from shapline.flows.parameters import ExplainParameters
from shapline.tasks.common.config import load_config

ROOT = Path(__file__).parents[2]
# prefect.yaml's entrypoint: the flow file of a checkout (SHAPLINE_HOME); `shapline deploy` uses the
# installed module instead (shapline.flows.explain.explain_model), which needs no checkout.
ENTRYPOINT = "flows/explain.py:explain_model"


def test_the_file_entrypoint_of_a_checkout_loads_the_installed_flow() -> None:
    from prefect.flows import load_flow_from_entrypoint

    from shapline.flows.explain import explain_model

    loaded = load_flow_from_entrypoint(str(ROOT / ENTRYPOINT))
    assert loaded.name == explain_model.name == "shapline-explain"


def test_prefect_yaml_matches_the_configs_it_deploys() -> None:
    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert project["deployments"]
    for deployment in project["deployments"]:
        assert deployment["entrypoint"] == ENTRYPOINT
        parameters = ExplainParameters.model_validate(deployment["parameters"])
        config = load_config(ROOT / parameters.config_path)
        assert deployment["name"] == config.model.name
        assert config.schedule is not None
        [schedule] = deployment["schedules"]
        assert schedule == {
            "cron": config.schedule.cron,
            "timezone": config.schedule.timezone,
            "active": config.schedule.active,
        }
