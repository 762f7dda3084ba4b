"""Docs stay true to the code: every hook is documented with its exact signature, the README's commands
are what CI runs, and every shipped example config validates."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from flowfactory import hookspecs

ROOT = Path(__file__).resolve().parents[2]


def hook_names() -> list[str]:
    return [n for n, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, "flowfactory_spec")]


@pytest.mark.parametrize("name", hook_names())
def test_every_hook_is_documented_with_its_signature(name):
    doc = (ROOT / "docs" / "hooks.md").read_text()
    fn = getattr(hookspecs, name)
    signature = f"{name}({', '.join(inspect.signature(fn).parameters)})"  # the types: "## The register callback"
    assert f"## {signature}" in doc, f"docs/hooks.md needs a section headed `## {signature}`"


def test_hooks_doc_names_no_missing_hook():
    doc = (ROOT / "docs" / "hooks.md").read_text()
    documented = re.findall(r"^## (\w+)\(", doc, flags=re.M)
    assert sorted(documented) == sorted(hook_names())


def readme_block(title: str) -> str:
    """The shell line under a README heading's first ```bash block."""
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"{re.escape(title)}.*?```bash\n(.*?)\n```", text, flags=re.S)
    assert m, f"README.md has no bash block after {title!r}"
    return m.group(1).strip()


def test_ci_runs_the_readme_test_command_exactly():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1].strip()
    assert readme_block("Run the tests") == ci


def test_readme_quickstart_runs_the_shipped_quickstart():
    cmd = readme_block("Quickstart")
    assert "pip install -r requirements.txt" in cmd and cmd.endswith("ff run examples/quickstart.yaml")
    assert (ROOT / "examples" / "quickstart.yaml").is_file()


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_validates(path):
    from flowfactory.config import load

    cfg, options = load(path)  # raises ConfigError listing every problem
    assert set(options) == {"policy", "sampler", "optimizer"} | {f"rewards[{i}]" for i in range(len(cfg.rewards))}


def hook_examples() -> list[str]:
    doc = (ROOT / "docs" / "hooks.md").read_text()
    return [b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.S) if "@hookimpl" in b]


@pytest.mark.parametrize("index", range(len(hook_examples())))
def test_hook_examples_register_what_they_say(index):
    """Each example in docs/hooks.md loads as a plugin and registers its component (or command)."""
    import types

    from flowfactory.plugins import load

    source = hook_examples()[index]
    module = types.ModuleType(f"docs_example_{index}")
    exec(compile(source, f"docs/hooks.md example {index}", "exec"), module.__dict__)
    state = load(entry_points=False, extra_plugins=[(module, "docs-example", "0")], strict=True)
    registered = re.findall(r'register\("([\w-]+)"', source)
    if registered:
        found = {s.name for s in state.registry.specs() if s.package == "docs-example"}
        assert found == set(registered)
    else:  # the command example
        import typer

        app = typer.Typer()
        module.register_commands(app)
        assert [c.name for c in app.registered_commands] == ["hello"]


def config_fields() -> list[tuple[str, object]]:
    from flowfactory.config import (
        DataConfig,
        EMAConfig,
        EvalConfig,
        GuardConfig,
        ParallelConfig,
        RewardConfig,
        RunConfig,
        TrainConfig,
        WandbConfig,
    )

    out = []
    for model, prefix in [(RunConfig, ""), (RewardConfig, "rewards[i]."), (DataConfig, "data."),
                          (TrainConfig, "train."), (EMAConfig, "train.ema."), (ParallelConfig, "train.parallel."),
                          (WandbConfig, "train.wandb."), (EvalConfig, "eval."), (GuardConfig, "eval.guard.")]:
        out += [(prefix + name, field) for name, field in model.model_fields.items()]
    return out


@pytest.mark.parametrize("key,field", config_fields(), ids=[k for k, _ in config_fields()])
def test_every_config_key_is_documented(key, field):
    assert f"| `{key}` |" in (ROOT / "docs" / "config.md").read_text(), f"docs/config.md lacks a row for `{key}`"
    assert field.description, f"{key} has no description (ff show and docs/config.md need one)"


def test_readme_reward_plugin_is_under_30_lines_and_scores_images():
    """The README's 'reward in under 30 lines' registers through the hook and scores like it says."""
    import types

    import torch

    from flowfactory.plugins import load
    from flowfactory.types import Samples

    text = (ROOT / "README.md").read_text()
    source = re.search(r"## Write a plugin.*?```python\n(.*?)```", text, flags=re.S).group(1)
    assert len([ln for ln in source.splitlines() if ln.strip()]) < 30
    module = types.ModuleType("my_reward")
    exec(compile(source, "README.md reward example", "exec"), module.__dict__)
    registry = load(entry_points=False, extra_plugins=[(module, "my-reward", "0")], strict=True).registry
    reward = registry.get("reward", "redness").create({"margin": 0.1})
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    grey = torch.full((1, 3, 4, 4), 0.5)
    scores = reward.score(Samples(prompts=["x", "y"], images=torch.cat([red, grey])))
    torch.testing.assert_close(scores, torch.tensor([0.9, -0.1]))


def test_readme_config_walkthrough_validates():
    import yaml

    from flowfactory.config import validate

    text = (ROOT / "README.md").read_text()
    block = re.search(r"## A config, walked through.*?```yaml\n(.*?)```", text, flags=re.S).group(1)
    cfg, options = validate(yaml.safe_load(block), "README.md")
    assert cfg.policy.name == "flux" and options["sampler"].sde_window_size == 2


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_accelerate_presets_load_and_are_named_in_the_readme(name):
    """The shipped launch presets are valid Accelerate configs, and the README shows their launch lines."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "configs" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type.value == "MULTI_GPU" and config.num_processes == 8
    assert f"--config_file configs/accelerate/{name}.yaml" in (ROOT / "README.md").read_text()
