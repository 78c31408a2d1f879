from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shapline.flows.cli import main
from shapline.flows.reference import config_reference
from shapline.tasks.common.config import (
    ExplainConfig,
    apply_overrides,
    config_schema,
    load_config,
    parse_config,
)
from shapline.tasks.common.errors import ConfigError

ROOT = Path(__file__).parents[3]
CONFIGS = ROOT / "tests" / "configs"


def test_reference_config_expresses_the_seed_scenario() -> None:
    config = load_config(CONFIGS / "valid.yaml")
    assert config.background.method == "random" and config.background.size == 50
    assert config.explainer.nsamples == "auto" and config.explainer.l1_reg == "aic"
    assert config.link == "logit"
    assert config.data.target == "Churn?" and config.data.drop == ["Phone"]
    assert config.experiment_name == "shapline/churn-xgb"


def test_relative_paths_resolve_against_the_yaml_folder() -> None:
    config = load_config(CONFIGS / "valid.yaml")
    assert config.model.path == str((CONFIGS / "models" / "churn.joblib").resolve())
    assert config.data.source == str((CONFIGS / "data" / "churn.csv").resolve())


def test_defaults_fill_every_optional_section() -> None:
    config = load_config(CONFIGS / "minimal.yaml")
    assert config.model.kind == "xgboost"
    assert config.model.effective_output == "predict_proba"
    assert config.shards.size == 100 and config.shards.runner == "thread"
    assert config.output.aggregations[0] == "mean_abs"
    assert config.validation.on_failure == "fail"


@pytest.mark.parametrize(
    ("task", "output", "link"),
    [
        ("classification", "predict_proba", "logit"),
        ("classification", "decision_function", "identity"),
        ("regression", None, "identity"),
    ],
)
def test_link_defaults_follow_the_output(task: str, output: str | None, link: str) -> None:
    raw = {
        "model": {"name": "m", "kind": "sklearn", "path": "/m", "task": task, "output": output},
        "data": {"source": "/d.csv"},
    }
    assert ExplainConfig.model_validate(raw).link == link


def test_overrides_set_nested_keys_parsed_as_yaml() -> None:
    config = load_config(
        CONFIGS / "valid.yaml",
        ["shards.size=7", "explainer.nsamples=300", "data.explain_rows=all", "output.plots=[bar]"],
    )
    assert config.shards.size == 7 and config.explainer.nsamples == 300
    assert config.output.plots == ["bar"]


def test_override_without_equals_is_rejected() -> None:
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["shards.size"])


def test_override_of_an_unknown_key_names_it() -> None:
    with pytest.raises(ConfigError, match=r"shards\.sise: unknown key"):
        load_config(CONFIGS / "valid.yaml", ["shards.sise=3"])


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("invalid_yaml.yaml", r"invalid_yaml\.yaml: not valid YAML"),
        ("invalid_unknown_key.yaml", r"shards\.sise: unknown key"),
        ("invalid_wrong_type.yaml", r"shards\.size: Input should be a valid integer.*'ten'"),
        ("invalid_missing_name.yaml", r"model\.name: required key is missing"),
        ("invalid_kind.yaml", r"model: .*'sklearn', 'xgboost', 'sagemaker', 'mlflow'"),
        ("invalid_l1_reg.yaml", r"explainer\.l1_reg: .*aic, bic, num_features\(k\) or false"),
        ("invalid_stratified.yaml", r"stratified needs data\.target"),
        ("invalid_not_mapping.yaml", r"expected a mapping of sections"),
        ("does_not_exist.yaml", r"config file not found"),
        ("invalid_duplicate_key.yaml", r"key 'name' appears twice in one mapping \(lines 2 and 5\)"),
        ("invalid_long_name.yaml", r"model\.name: String should have at most 200 characters, got 'm+\.\.\.$"),
        ("invalid_alias_bomb.yaml", r"expands to more than 100,000 values"),
        ("invalid_deep.yaml", r"nested too deeply to read"),
        ("invalid_repeated_feature.yaml", r"data\.features: .*'a' listed more than once"),
    ],
)
def test_bad_configs_fail_with_one_line_naming_file_and_key(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(CONFIGS / name)
    assert "\n" not in str(caught.value)
    assert name in str(caught.value)
    assert len(str(caught.value)) < 400  # an excerpt of what was typed, never all of it


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("invalid_alias_bomb.yaml", r"expands to more than 100,000 values"),
        ("invalid_deep.yaml", r"nested too deeply to read"),
        ("invalid_duplicate_key.yaml", r"key 'name' appears twice"),
        # Prefect's own schedule rules, so `validate` refuses what `deploy` would.
        ("invalid_cron.yaml", r"schedule: Invalid cron string: \"61 6 \* \* 1\""),
        ("invalid_timezone.yaml", r"schedule: Invalid timezone: \"Mars/Olympus_Mons\""),
    ],
)
def test_the_cli_refuses_hostile_and_subtly_wrong_configs_with_exit_2(
    name: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["validate", str(CONFIGS / name), "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and name in err and "Traceback" not in err
    assert re.search(message, err), err
    assert json.loads(out.strip().splitlines()[-1])["status"] == "FAILED"


def test_cli_prints_one_error_line_and_exits_2_for_a_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(CONFIGS / "invalid_unknown_key.yaml"), "--json"])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.strip().count("\n") == 0 and "shards.sise: unknown key" in err
    assert "Traceback" not in err
    assert json.loads(out.strip().splitlines()[-1])["status"] == "FAILED"


def test_schema_command_prints_the_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == config_schema()
    assert {"model", "data", "validation", "background", "explainer", "shards", "output"} <= set(
        schema["properties"]
    )


def test_the_docs_config_reference_matches_the_schema() -> None:
    page = (ROOT / "docs" / "config.md").read_text()
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    documented = page.split(start, 1)[1].split(end, 1)[0].strip()
    assert documented == config_reference().strip(), "regenerate with: shapline schema --markdown"


def test_every_schema_key_is_in_the_reference() -> None:
    reference = config_reference()
    for section, spec in config_schema()["properties"].items():
        if section == "model":
            continue
        ref = spec.get("$ref") or next(option["$ref"] for option in spec["anyOf"] if "$ref" in option)
        definition = config_schema()["$defs"][ref.split("/")[-1]]
        for key in definition["properties"]:
            assert f"`{section}.{key}" in reference


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        (
            "data",
            {"source": "/d.csv", "seed": -1},
            r"data\.seed: Input should be greater than or equal to 0, got -1",
        ),
        (
            "background",
            {"seed": 2**32},
            r"background\.seed: Input should be less than or equal to 4294967295",
        ),
        ("explainer", {"seed": 2**40}, r"explainer\.seed: Input should be less than or equal to 4294967295"),
        ("explainer", {"l1_reg": "num_features(0)"}, r"explainer\.l1_reg: num_features\(k\) selects k >= 1"),
        (
            "explainer",
            {"additivity_tolerance": 0},
            r"explainer\.additivity_tolerance: Input should be greater than 0",
        ),
        ("shards", {"timeout_s": -5}, r"shards\.timeout_s: Input should be greater than 0"),
        ("model", {"sha256": "abc"}, r"model\.sha256: String should match pattern"),
        (
            "background",
            {"method": "stratified"},
            r"background\.method stratified draws by class; a regression target has none",
        ),
    ],
)
def test_impossible_settings_are_refused_by_key(
    section: str, values: dict[str, object], message: str
) -> None:
    raw: dict[str, dict[str, object]] = {
        "model": {"name": "m", "kind": "sklearn", "path": "/m", "task": "regression"},
        "data": {"source": "/d.csv", "target": "y"},
    }
    raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, "c.yaml")


@pytest.mark.parametrize(
    ("override", "line"),
    [
        # pydantic names each member of a union (constrained-int, literal['all']): one line says the key's own
        ("data.explain_rows=abc", "data.explain_rows: expected a whole number >= 1 or all, got 'abc'"),
        ("data.explain_rows=0", "data.explain_rows: expected a whole number >= 1 or all, got 0"),
        ("explainer.nsamples=lots", "explainer.nsamples: expected a whole number >= 1 or auto, got 'lots'"),
        ("model.class_index=x", "model.class_index: Input should be a valid integer, got 'x'"),
    ],
)
def test_a_value_no_member_of_a_union_takes_is_one_line_in_the_users_words(override: str, line: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(CONFIGS / "valid.yaml", [override])
    said = str(caught.value).split(": ", 1)[1]
    assert said == line
    for internal in ("constrained-int", "literal[", "function-", "Input should be 'all'"):
        assert internal not in said


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("data.explan_rows=3", "data.explan_rows: unknown key; did you mean data.explain_rows?"),
        ("shards.sise=3", "shards.sise: unknown key; did you mean shards.size?"),
        ("modle.name=x", "modle: unknown key; did you mean model?"),
        ("model.pth=x", "model.pth: unknown key; did you mean model.path?"),  # the sklearn model's keys
        (
            "monitor.max_importance=0.5",
            "monitor.max_importance: unknown key; did you mean monitor.max_importance_change?",
        ),
        ("output.zzz=1", "output.zzz: unknown key"),  # nothing close: no guess
    ],
)
def test_a_misspelled_key_gets_a_did_you_mean_from_its_sections_keys(override: str, line: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(CONFIGS / "valid.yaml", [override])
    assert str(caught.value).split(": ", 1)[1] == line


def test_comparable_runs_share_an_identity_and_a_row_selection() -> None:
    """monitor.baseline previous matches runs by these: the settings (not the model's file) and the rows."""
    base = load_config(CONFIGS / "valid.yaml")

    def changed(*overrides: str) -> tuple[bool, bool]:
        other = load_config(CONFIGS / "valid.yaml", list(overrides))
        return (
            other.identity_sha256() == base.identity_sha256(),
            other.selection_sha256() == base.selection_sha256(),
        )

    assert changed() == (True, True)
    # Where results go, how many compute them, the monitor and a retrained model's file: the same run.
    assert changed("shards.workers=7", "monitor.ndcg_threshold=0.5", "model.path=/other.joblib") == (
        True,
        True,
    )
    assert changed("data.source=/elsewhere.csv") == (True, False)
    assert changed("data.explain_rows=40") == (True, False)  # a schedule's sample is other rows
    assert changed("background.size=20") == (False, True)
    assert changed("explainer.nsamples=99") == (False, True)
    # The seed draws a sample: with every row explained it changes nothing.
    assert load_config(CONFIGS / "valid.yaml", ["data.seed=9"]).selection_sha256() == base.selection_sha256()
    sample = load_config(CONFIGS / "valid.yaml", ["data.explain_rows=40"])
    seeded = load_config(CONFIGS / "valid.yaml", ["data.explain_rows=40", "data.seed=9"])
    assert sample.selection_sha256() != seeded.selection_sha256()


def test_monitor_baseline_takes_reference_and_max_importance_change_is_off_by_default() -> None:
    config = load_config(CONFIGS / "valid.yaml", ["monitor.baseline=reference"])
    assert config.monitor.baseline == "reference" and config.monitor.max_importance_change is None
    with pytest.raises(
        ConfigError, match=r"monitor\.baseline: expected previous, reference, none or an MLflow"
    ):
        load_config(CONFIGS / "valid.yaml", ["monitor.baseline=latest"])
