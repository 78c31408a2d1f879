from __future__ import annotations

from pathlib import Path

import yaml

from flows.config import ExplainParameters, load_config
from flows.deploy import ENTRYPOINT

ROOT = Path(__file__).parents[2]


def test_prefect_yaml_matches_the_configs_it_deploys() -> None:
    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert project["deployments"]
    for deployment in project["deployments"]:
        assert deployment["entrypoint"] == ENTRYPOINT
        parameters = ExplainParameters.model_validate(deployment["parameters"]["parameters"])
        config = load_config(ROOT / parameters.config_path)
        assert deployment["name"] == config.model.name
        assert config.schedule is not None
        [schedule] = deployment["schedules"]
        assert schedule == {
            "cron": config.schedule.cron,
            "timezone": config.schedule.timezone,
            "active": config.schedule.active,
        }
