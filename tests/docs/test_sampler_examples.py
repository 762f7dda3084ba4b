"""docs/hooks.md's sampler examples, a new SDE sampler that defines only `sde_step` and a new ODE sampler
that defines only `ode_step`, pass the shipped `SamplerContract` as written."""

from __future__ import annotations

import re
import types
from pathlib import Path

import torch

from flowfactory.testing import SamplerContract, load_registry, make_generators

ROOT = Path(__file__).resolve().parents[2]


def _example(registered: str) -> types.ModuleType:
    doc = (ROOT / "docs" / "hooks.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.S) if f'register("{registered}"' in b]
    assert len(blocks) == 1, f"docs/hooks.md should have one example registering {registered!r}"
    module = types.ModuleType(f"hooks_md_{registered.replace('-', '_')}")
    exec(compile(blocks[0], f"docs/hooks.md {registered} example", "exec"), module.__dict__)
    return module


SDE_EXAMPLE = [(_example("constant-noise"), "docs-sde-example", "0")]
ODE_EXAMPLE = [(_example("clipped-ode"), "docs-ode-example", "0")]


class TestDocsSDESampler(SamplerContract):
    component = "constant-noise"
    options = {"steps": 4, "std": 0.05}
    extra_plugins = SDE_EXAMPLE


class TestDocsODESampler(SamplerContract):
    component = "clipped-ode"
    options = {"steps": 4, "clip": 0.5}
    extra_plugins = ODE_EXAMPLE
    stochastic = False


def test_the_examples_subclass_the_public_bases_and_define_only_their_step() -> None:
    from flowfactory.samplers import ODESampler, SDESampler
    from flowfactory.samplers.flow import FlowSDESampler

    sde = load_registry(SDE_EXAMPLE).get("sampler", "constant-noise").create({"steps": 4})
    ode = load_registry(ODE_EXAMPLE).get("sampler", "clipped-ode").create({"steps": 4, "clip": 100.0})
    assert isinstance(sde, SDESampler) and isinstance(ode, ODESampler)
    assert {k for k in vars(type(sde)) if not k.startswith("_")} == {"sde_step"}
    assert {k for k in vars(type(ode)) if not k.startswith("_")} == {"ode_step"}
    assert issubclass(FlowSDESampler, SDESampler)

    # With nothing clipped the clipped-x0 step is the Euler step of the built-in `ode`.
    registry = load_registry()
    euler = registry.get("sampler", "ode").create({"steps": 4})
    policy = registry.get("policy", "toy").create({"size": 8, "hidden": 16})
    cond = policy.encode(["a red square", "a blue circle"])
    noise = policy.noise(make_generators([0, 1]))
    a = ode.rollout(policy, cond, noise, make_generators([2, 3]), keep="final")
    b = euler.rollout(policy, cond, noise, make_generators([2, 3]), keep="final")
    torch.testing.assert_close(a.final, b.final, atol=1e-5, rtol=0)
