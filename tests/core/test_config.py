"""Run configs: parsing, unknown keys, all problems at once with locations, --set overrides, file errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

from flowfactory import config as ff_config
from flowfactory import hookimpl
from flowfactory.config import PATH_OR_HUB_ID
from flowfactory.errors import ConfigError, FlowFactoryError


def _problems(exc: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return dict(exc.value.problems)


def test_valid_config_parses_with_component_options(plugin_state, config_file) -> None:
    path = config_file()
    cfg, options = ff_config.load(path, registry=plugin_state.registry)
    assert (cfg.name, cfg.seed) == ("test-run", 3)
    assert (cfg.policy.name, cfg.sampler.name, cfg.optimizer.name) == ("tiny-policy", "flow-sde", "fake-opt")
    assert [(r.name, r.weight) for r in cfg.rewards] == [("brightness", 1.0), ("jpeg-compressibility", 0.5)]
    assert (cfg.train.epochs, cfg.train.group_size, cfg.train.prompts_per_epoch) == (3, 4, 2)
    assert cfg.train.lr == 3e-4  # a default
    assert set(options) == {"policy", "sampler", "optimizer", "rewards[0]", "rewards[1]"}
    policy = options["policy"]
    assert type(policy).__name__ == "TinyPolicyOptions"
    assert (policy.size, policy.preset, policy.lora.rank, policy.lora.alpha) == (16, None, 2, None)
    assert (options["sampler"].steps, options["sampler"].noise_level) == (8, 0.5)
    assert options["optimizer"].clip_range == 0.1
    assert options["rewards[1]"].quality == 95  # jpeg default


def test_validate_uses_the_process_wide_registry_by_default(plugin_state, config_file) -> None:
    cfg, _ = ff_config.load(config_file())  # no registry given: get_registry() is plugin_state's
    assert cfg.policy.name == "tiny-policy"


def test_unknown_keys_anywhere_are_errors_with_suggestions(plugin_state, config_file) -> None:
    path = config_file(
        polcy={"name": "x"},
        train={"epoch": 3},
        data={"train": "colours", "evl": None},
        sampler={"name": "flow-sde", "option": {}},
        policy={"name": "tiny-policy", "options": {"sise": 8, "lora": {"rank": 2, "dropout": 0.1}}},
        rewards=[{"name": "brightness", "wieght": 2}],
    )
    with pytest.raises(ConfigError) as exc:
        ff_config.load(path, registry=plugin_state.registry)
    listing = "; `ff show policy tiny-policy` lists the options"
    assert _problems(exc) == {
        "polcy": "unknown key; remove it or check its spelling (did you mean 'policy'?)",
        "train.epoch": "unknown key; remove it or check its spelling (did you mean 'epochs'?)",
        "data.evl": "unknown key; remove it or check its spelling (did you mean 'eval'?)",
        "sampler.option": "unknown key; remove it or check its spelling (did you mean 'options'?)",
        "rewards[0].wieght": "unknown key; remove it or check its spelling (did you mean 'weight'?)",
        "policy.options.sise": "unknown key; remove it or check its spelling (did you mean 'size'?)" + listing,
        "policy.options.lora.dropout": "unknown key; remove it or check its spelling" + listing,
    }


def test_every_problem_of_a_file_is_reported_at_once(plugin_state, config_file) -> None:
    path = config_file(
        train={"epochs": 0, "group_size": 4},
        policy={"name": "tiny-policy", "options": {"size": 1}},
        rewards=[{"name": "brightnes"}],
        sampler={"name": "flow-sde", "options": {"steps": "eight"}},
        optimizer=None,
    )
    with pytest.raises(ConfigError) as exc:
        ff_config.load(path, registry=plugin_state.registry)
    problems = _problems(exc)
    assert problems == {
        "train.epochs": "Input should be greater than or equal to 1",
        "optimizer": "required key is missing",
        "policy.options.size": "Input should be greater than or equal to 2",
        "sampler.options.steps": "Input should be a valid integer, unable to parse string as an integer",
        "rewards[0].name": (
            "no reward named 'brightnes' is installed. Did you mean 'brightness'? Installed rewards: "
            + ", ".join(plugin_state.registry.names("reward"))
            + ". `ff list reward` shows them; a missing one may need its package installed."),
    }
    assert exc.value.source == str(path)
    lines = str(exc.value).splitlines()
    assert lines[0] == f"{path}: 5 problems"
    assert "  train.epochs: Input should be greater than or equal to 1" in lines


def test_component_model_validators_report_at_the_options(plugin_state, config_file) -> None:
    path = config_file(sampler={"name": "flow-sde", "options": {"steps": 4, "sde_window_size": 9}})
    with pytest.raises(ConfigError) as exc:
        ff_config.load(path, registry=plugin_state.registry)
    assert list(_problems(exc)) == ["sampler.options"]
    assert "sde_window_size=9 exceeds the 3 steps that can be stochastic" in _problems(exc)["sampler.options"]


def test_structural_checks(plugin_state, config_file) -> None:
    reg = plugin_state.registry
    with pytest.raises(ConfigError) as exc:
        ff_config.load(config_file(rewards=[]), registry=reg)
    assert list(_problems(exc)) == ["rewards"]
    with pytest.raises(ConfigError) as exc:
        ff_config.load(config_file(rewards=[{"name": "brightness"}, {"name": "brightness"}]), registry=reg)
    assert _problems(exc) == {"rewards": "Value error, reward 'brightness' is listed twice; list each reward once"}
    with pytest.raises(ConfigError) as exc:
        ff_config.load(config_file(train={"prompts_per_epoch": 3, "group_size": 3, "steps_per_epoch": 2}),
                       registry=reg)
    assert _problems(exc) == {"train.steps_per_epoch": "must divide the rollouts each process trains on: "
                                                       "prompts_per_epoch * group_size = 9 over one process"}


def test_the_epoch_splits_over_processes_on_group_boundaries(plugin_state, config_file) -> None:
    """3 prompts x 4 on 2 processes would give a process half a group: refused for that launch, with the fix."""
    reg = plugin_state.registry
    path = config_file(train={"prompts_per_epoch": 3, "group_size": 4})
    ff_config.load(path, registry=reg)  # one process takes every group
    with pytest.raises(ConfigError) as exc:
        ff_config.load(path, registry=reg, processes=2)
    assert _problems(exc) == {"train.prompts_per_epoch": (
        "3 prompts (groups) per epoch do not split evenly over 2 processes: each process takes whole groups. "
        "Use a multiple of 2, or launch a divisor of 3 processes")}
    with pytest.raises(ConfigError) as exc:
        ff_config.load(config_file(train={"prompts_per_epoch": 4, "group_size": 3, "steps_per_epoch": 4}),
                       registry=reg, processes=2)
    assert _problems(exc) == {"train.steps_per_epoch": "must divide the rollouts each process trains on: "
                                                       "prompts_per_epoch * group_size = 12 over 2 processes, so 6 per "
                                                       "process"}


@pytest.mark.parametrize(("override", "check"), [
    ("train.epochs=5", lambda cfg, opts: cfg.train.epochs == 5),
    ("rewards.1.weight=2.5", lambda cfg, opts: cfg.rewards[1].weight == 2.5),
    ("train.ema.enabled=true", lambda cfg, opts: cfg.train.ema.enabled is True),
    ("data.eval=null", lambda cfg, opts: cfg.data.eval is None),
    ("train.lr=1e-4", lambda cfg, opts: cfg.train.lr == 1e-4),
    ("name=run 2", lambda cfg, opts: cfg.name == "run 2"),
    ("name=123", None),  # YAML reads a number; the name must be a string
    ("policy.options.lora.alpha=8", lambda cfg, opts: opts["policy"].lora.alpha == 8.0),
    ("policy.options.preset=tiny", lambda cfg, opts: opts["policy"].preset == "tiny"),
])
def test_set_overrides_are_typed_as_yaml(plugin_state, config_file, override: str, check) -> None:
    path = config_file()
    if check is None:
        with pytest.raises(ConfigError) as exc:
            ff_config.load(path, [override], registry=plugin_state.registry)
        assert _problems(exc) == {"name": "Input should be a valid string"}
        return
    cfg, opts = ff_config.load(path, [override], registry=plugin_state.registry)
    assert check(cfg, opts)


def test_several_overrides_combine(plugin_state, config_file) -> None:
    _, opts = ff_config.load(config_file(), ["sampler.options.sde_window_size=2",
                                             "sampler.options.sde_window_range=[0, 2]"],
                             registry=plugin_state.registry)
    assert (opts["sampler"].sde_window_size, opts["sampler"].sde_window_range) == (2, (0, 2))


def test_set_overrides_are_applied_in_order_without_touching_the_input() -> None:
    data = {"train": {"epochs": 3}, "rewards": [{"name": "a"}]}
    out = ff_config.apply_overrides(data, ["train.epochs=4", "train.epochs=6", "rewards.0.weight=2",
                                           "policy.options.lora.rank=8"], "cfg.yaml")
    assert out == {"train": {"epochs": 6}, "rewards": [{"name": "a", "weight": 2}],
                   "policy": {"options": {"lora": {"rank": 8}}}}
    assert data == {"train": {"epochs": 3}, "rewards": [{"name": "a"}]}


def test_bad_set_paths_are_all_reported() -> None:
    data = {"name": "x", "train": {"epochs": 3}, "rewards": [{"name": "a"}]}
    with pytest.raises(ConfigError) as exc:
        ff_config.apply_overrides(data, ["rewards.3.weight=1", "name.first=1", "rewards.x=1", "train.epochs",
                                         "train..epochs=1"], "cfg.yaml")
    assert exc.value.problems == [
        ("--set rewards.3.weight", "this path does not exist in the config"),
        ("--set name.first", "this path does not exist in the config"),
        ("--set rewards.x", "this path does not exist in the config"),
        ("--set train.epochs", "expected KEY=VALUE, e.g. --set train.epochs=5"),
        ("--set train..epochs=1", "the key has an empty part; write it like train.epochs=5"),
    ]
    assert str(exc.value).splitlines()[0] == "cfg.yaml: 5 problems"


def test_override_values_are_validated_like_the_file(plugin_state, config_file) -> None:
    with pytest.raises(ConfigError) as exc:
        ff_config.load(config_file(), ["train.epochs=zero", "policy.options.lora.rank=0"],
                       registry=plugin_state.registry)
    assert _problems(exc) == {
        "train.epochs": "Input should be a valid integer, unable to parse string as an integer",
        "policy.options.lora.rank": "Input should be greater than or equal to 1",
    }


def test_parse_value() -> None:
    assert ff_config.parse_value("5") == 5
    assert ff_config.parse_value("0.5") == 0.5
    assert ff_config.parse_value("false") is False
    assert ff_config.parse_value("[1, 2]") == [1, 2]
    assert ff_config.parse_value("red square") == "red square"
    assert ff_config.parse_value("a: [") == "a: ["  # not YAML: kept as text


def test_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(FlowFactoryError) as exc:
        ff_config.load(path)
    assert str(exc.value) == f"{path}: no such config file; check the path"


def test_directory_names_it(tmp_path: Path) -> None:
    with pytest.raises(FlowFactoryError) as exc:
        ff_config.load(tmp_path)
    assert str(exc.value) == f"{tmp_path}: is not a file; give the path of a YAML run config"


def test_bad_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\npolicy: {name: flux\nsampler: ode\n")
    with pytest.raises(ConfigError) as exc:
        ff_config.load(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: 1 problem\n  not valid YAML: ")
    assert "line 3" in msg


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just text\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        ff_config.load(path)
    assert exc.value.problems == [("", "the top level must be a mapping of keys (name, policy, sampler, ...)")]


def test_undecodable_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00name")
    with pytest.raises(FlowFactoryError, match=r"binary\.yaml: cannot be read .*readable UTF-8 YAML file"):
        ff_config.load(path)


def test_a_dumped_config_loads_back_equal(plugin_state, config_file, tmp_path: Path) -> None:
    cfg, options = ff_config.load(config_file(), registry=plugin_state.registry)
    path = tmp_path / "dumped.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    again, again_options = ff_config.load(path, registry=plugin_state.registry)
    assert again == cfg
    assert again_options == options


class _PathOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="A pipeline folder or hub id.", json_schema_extra=PATH_OR_HUB_ID)


class _PathPolicyPlugin:
    @hookimpl
    def register_policies(self, register):
        register("path-policy", lambda options, ctx: options, options=_PathOptions, summary="Test: a path option.")


@pytest.fixture
def path_registry(make_state, components_plugin):
    return make_state(components_plugin, _PathPolicyPlugin()).registry


def _with_model(config_file, value: str) -> Path:
    return config_file(policy={"name": "path-policy", "options": {"model": value}})


def test_a_relative_model_folder_resolves_against_the_configs_folder(path_registry, config_file, tmp_path,
                                                                   monkeypatch) -> None:
    """Like data.train: the config's folder first, then the working directory; the run gets the absolute path."""
    (tmp_path / "pipelines" / "tiny").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory has no such folder
    _, options = ff_config.load(_with_model(config_file, "pipelines/tiny"), registry=path_registry)
    assert options["policy"].model == str((tmp_path / "pipelines" / "tiny").resolve())
    (elsewhere / "cwd-only").mkdir()
    _, options = ff_config.load(_with_model(config_file, "cwd-only"), registry=path_registry)
    assert options["policy"].model == str((elsewhere / "cwd-only").resolve())


def test_a_hub_id_stays_and_a_missing_local_folder_is_a_config_error(path_registry, config_file) -> None:
    _, options = ff_config.load(_with_model(config_file, "black-forest-labs/FLUX.1-dev"), registry=path_registry)
    assert options["policy"].model == "black-forest-labs/FLUX.1-dev"
    for missing in ("./pipelines/none", "/no/such/folder", "a/b/c"):
        with pytest.raises(ConfigError) as exc:
            ff_config.load(_with_model(config_file, missing), registry=path_registry)
        msg = _problems(exc)["policy.options.model"]
        assert f"{missing!r} is not a folder" in msg and "not a hub id (owner/name)" in msg
