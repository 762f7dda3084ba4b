"""Fixtures for end-to-end runs on the toy policy (no diffusers, seconds per run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import flowfactory.plugins as plugins
from flowfactory.testing import plugin as toy_plugin

TOY_CONFIG = {
    "name": "toy",
    "seed": 0,
    "policy": {"name": "toy", "options": {"size": 8}},
    "sampler": {"name": "flow-sde", "options": {"steps": 6}},
    "rewards": [{"name": "brightness"}],
    "optimizer": {"name": "grpo", "options": {"clip_range": 0.2}},
    "train": {"epochs": 20, "prompts_per_epoch": 2, "group_size": 8, "lr": 3.0e-3, "micro_batch_size": 8,
              "eval_every": 5, "sample_every": 5, "checkpoint_every": 5, "eval_prompts": 2},
}


@pytest.fixture
def toy_registry(monkeypatch):
    """The process-wide plugin state with the toy policy added."""
    state = plugins.load(extra_plugins=[(toy_plugin, "flowfactory-testing", "0")], strict=True)
    monkeypatch.setattr(plugins, "_STATE", state)
    return state.registry


@pytest.fixture
def toy_config(tmp_path: Path):
    """Writes a toy config (with optional deep overrides) and returns its path."""

    def make(**sections) -> Path:
        data = yaml.safe_load(yaml.safe_dump(TOY_CONFIG))
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key].update(value)
            else:
                data[key] = value
        path = tmp_path / f"toy-{len(list(tmp_path.glob('toy-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return make
