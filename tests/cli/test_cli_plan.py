"""`ff plan CONFIG [--processes N] [--set k=v] [--json]`: per-process memory before launch, no weights loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import flowfactory.plugins as ff_plugins
from flowfactory.testing import plugin as toy_plugin
from flowfactory_cli.main import create_app

CONFIGS = Path(__file__).parents[1] / "data" / "model-configs"


def invoke(*args: str, state: ff_plugins.PluginState | None = None):
    app = create_app(state or ff_plugins.load(), strict=True)
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"}, catch_exceptions=False)


def write(tmp_path: Path, policy: dict, **train) -> Path:
    data = {"name": "plan", "policy": policy, "sampler": {"name": "flow-sde", "options": {"steps": 10}},
            "rewards": [{"name": "brightness"}], "optimizer": {"name": "grpo", "options": {"kl_beta": 0.0}},
            "data": {"train": "colours", "eval": None},
            "train": {"prompts_per_epoch": 16, "group_size": 24, **train}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_plan_flux_dev_lora_prints_table_and_total(tmp_path: Path) -> None:
    pytest.importorskip("flowfactory_flux")
    path = write(tmp_path, {"name": "flux", "options": {"model": str(CONFIGS / "flux.1-dev"), "lora": {"rank": 32}}})
    result = invoke("plan", str(path), "--processes", "8")
    assert result.exit_code == 0, result.output
    for text in ("11,953,706,048", "52,297,728", "memory per process (8 processes, ddp)", "frozen transformer weights",
                 "22.17 GiB", "conditioning cache", "rollout buffer", "48 rollouts", "activations", "not estimated",
                 "total"):
        assert text in result.stdout, text


def test_plan_json_fsdp_divides_by_processes(tmp_path: Path) -> None:
    pytest.importorskip("flowfactory_flux")
    path = write(tmp_path, {"name": "flux", "options": {"model": str(CONFIGS / "flux.1-dev")}})
    one = json.loads(invoke("plan", str(path), "--json").stdout)
    eight = json.loads(invoke("plan", str(path), "--json", "-n", "8", "--set", "train.parallel.strategy=fsdp").stdout)
    rows1 = {r["item"]: r["bytes"] for r in one["rows"]}
    rows8 = {r["item"]: r["bytes"] for r in eight["rows"]}
    assert rows1["trainable parameters"] == 4 * 11_901_408_320
    assert rows8["trainable parameters"] == rows1["trainable parameters"] // 8
    assert rows8["optimizer state (AdamW)"] == 2 * rows8["trainable parameters"] + 4 * 1160
    assert "reference copy" not in rows1  # kl_beta 0: a full finetune keeps no frozen copy
    assert eight["activations"] == "not estimated" and eight["device_total"] == sum(rows8.values())


def test_plan_errors_are_one_message(tmp_path: Path, user_error) -> None:
    state = ff_plugins.load(entry_points=False, extra_plugins=[(toy_plugin, "flowfactory-testing", "0")])
    path = write(tmp_path, {"name": "toy"}, prompts_per_epoch=2, group_size=3)
    path.write_text(path.read_text().replace("name: grpo", "name: nope"))
    user_error(invoke("plan", str(path), state=state), "optimizer.name", "nope")
    pytest.importorskip("flowfactory_grpo")
    path = write(tmp_path, {"name": "toy"}, prompts_per_epoch=2, group_size=3)
    user_error(invoke("plan", str(path), "--processes", "4", state=ff_plugins.load(
        extra_plugins=[(toy_plugin, "flowfactory-testing", "0")])), "2 prompts (groups) per epoch", "4 processes")
