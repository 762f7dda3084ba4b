"""Shared test setup.

Plugin failures are errors in tests, as in CI: FLOWFACTORY_STRICT_PLUGINS=1 is set for the whole session.

Fixtures for a controlled plugin state (independent of which plugin packages are installed):
- `components_plugin`: an inline plugin adding policy `tiny-policy` (nested `lora` options) and optimizer
  `fake-opt`, package `test-plugins` 1.0;
- `make_state(*plugins, strict=True)`: built-ins plus the given inline plugins, no entry points;
- `plugin_state`: `make_state(components_plugin)`, also installed as the process-wide state, so code that
  calls `flowfactory.plugins.get_state()` sees it;
- `fake_entry_points(...)`: replaces the installed entry points of group `flowfactory` with fakes;
- `config_file(**changes)`: writes a valid run config for `plugin_state` (top-level keys replaced).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

os.environ["FLOWFACTORY_STRICT_PLUGINS"] = "1"  # set at import, before any test loads plugins

# `pytest` runs the suite over several worker processes (pytest-xdist, `-n auto` in pyproject.toml). Each worker
# gets an equal share of the cores for torch's intra-op threads, set before torch is imported so that this
# process and every `ff run` it starts use the same count (oversubscribed threads make CPU torch several
# times slower). A run without workers (`pytest -n 0`) keeps torch's default.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(_threads))

import flowfactory.plugins as ff_plugins
from flowfactory import hookimpl
from flowfactory.types import OptimizerHooks, Requirements

TEST_PACKAGE = "test-plugins"
TEST_VERSION = "1.0"


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rank: int = Field(4, ge=1, description="LoRA rank.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; null: equal to rank.")


class TinyPolicyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preset: Literal["tiny"] | None = Field(None, description="Built-in size preset.")
    size: int = Field(8, ge=2, description="Image side in pixels.")
    lora: LoraOptions | None = Field(None, description="LoRA settings; null: full finetune.")


class FakeOptOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clip_range: float = Field(0.2, gt=0, description="Ratio clip.")


@dataclass
class Built:
    """What the test components' build functions return: the options and context they were given."""

    options: Any
    ctx: Any


def build_component(options: Any, ctx: Any) -> Built:
    return Built(options, ctx)


class BuiltAlgorithm(Built, OptimizerHooks):
    """`fake-opt`'s build result: an algorithm (every one subclasses OptimizerHooks) that fits any sampler."""

    requirements = Requirements(keep="final", stochastic=False)


def build_algorithm(options: Any, ctx: Any) -> BuiltAlgorithm:
    return BuiltAlgorithm(options, ctx)


class ComponentsPlugin:
    """Inline plugin with a policy and an optimizer, the two kinds core does not ship."""

    @hookimpl
    def register_policies(self, register: Callable[..., None]) -> None:
        register("tiny-policy", build_component, options=TinyPolicyOptions,
                 summary="A tiny test policy.\nSecond line is not part of the summary.")

    @hookimpl
    def register_optimizers(self, register: Callable[..., None]) -> None:
        register("fake-opt", build_algorithm, options=FakeOptOptions, summary="A test optimizer.")


VALID_CONFIG: dict[str, Any] = {
    "name": "test-run",
    "seed": 3,
    "policy": {"name": "tiny-policy", "options": {"size": 16, "lora": {"rank": 2}}},
    "sampler": {"name": "flow-sde", "options": {"steps": 8, "noise_level": 0.5}},
    "rewards": [{"name": "brightness", "weight": 1.0}, {"name": "jpeg-compressibility", "weight": 0.5}],
    "optimizer": {"name": "fake-opt", "options": {"clip_range": 0.1}},
    "train": {"epochs": 3, "group_size": 4, "prompts_per_epoch": 2},
}


@pytest.fixture
def components_plugin() -> ComponentsPlugin:
    return ComponentsPlugin()


@pytest.fixture
def make_state() -> Callable[..., ff_plugins.PluginState]:
    """Build a plugin state from the built-ins and inline plugins (objects, or (object, package, version))."""

    def make(*plugins: Any, strict: bool = True) -> ff_plugins.PluginState:
        extra = [p if isinstance(p, tuple) else (p, TEST_PACKAGE, TEST_VERSION) for p in plugins]
        return ff_plugins.load(entry_points=False, extra_plugins=extra, strict=strict)

    return make


@pytest.fixture
def plugin_state(make_state, components_plugin, monkeypatch) -> ff_plugins.PluginState:
    state = make_state(components_plugin)
    monkeypatch.setattr(ff_plugins, "_STATE", state)
    return state


@dataclass
class FakeDist:
    name: str
    version: str

    @property
    def metadata(self) -> dict[str, str]:
        return {"Name": self.name}


@dataclass
class FakeEntryPoint:
    """Stands in for importlib.metadata.EntryPoint: name, value, dist and load()."""

    name: str
    value: str
    dist: FakeDist | None
    loader: Callable[[], Any]
    group: str = "flowfactory"

    def load(self) -> Any:
        return self.loader()


@pytest.fixture
def fake_entry_points(monkeypatch) -> Callable[..., list[FakeEntryPoint]]:
    """`fake_entry_points((name, package, version, loader), ...)` makes those the only installed plugins.

    `loader` returns the plugin object, or raises to simulate a broken package; package None gives an entry
    point without distribution metadata.
    """

    def install(*specs: tuple[str, str | None, str, Callable[[], Any]]) -> list[FakeEntryPoint]:
        eps = [FakeEntryPoint(name, f"{name}_module", FakeDist(pkg, ver) if pkg else None, loader)
               for name, pkg, ver, loader in specs]

        def entry_points(*, group: str) -> list[FakeEntryPoint]:
            return [ep for ep in eps if ep.group == group]

        monkeypatch.setattr(ff_plugins.metadata, "entry_points", entry_points)
        return eps

    return install


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[..., Path]:
    """Write VALID_CONFIG with top-level keys replaced (a value of None removes the key); returns its path."""
    count = 0

    def write(**changes: Any) -> Path:
        nonlocal count
        data = yaml.safe_load(yaml.safe_dump(VALID_CONFIG))
        for key, value in changes.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        count += 1
        path = tmp_path / f"run-{count}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per core, at most 4 (the multi-process tests start 2 more processes each)."""
    return max(1, min(os.cpu_count() or 1, 4))
