"""docs/hooks.md's toolkit example (`clipped-pg`) is a working algorithm: it passes the optimizer contract, and on a
rollout reused after an update its loss is PPO's clipped surrogate computed here by hand."""

from __future__ import annotations

import math
import re
import types
from pathlib import Path

import torch

from flowfactory.testing import OptimizerContract

ROOT = Path(__file__).resolve().parents[2]


def example_module() -> types.ModuleType:
    doc = (ROOT / "docs" / "hooks.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.S) if 'register("clipped-pg"' in b]
    module = types.ModuleType("hooks_md_clipped_pg")
    exec(compile(block, "docs/hooks.md clipped-pg example", "exec"), module.__dict__)
    return module


EXAMPLE = example_module()


class TestClippedPGExample(OptimizerContract):
    component = "clipped-pg"
    extra_plugins = ((EXAMPLE, "docs-example", "0"),)


def test_clipped_pg_loss_is_the_clipped_surrogate_by_hand() -> None:
    from flowfactory.testing.contracts import load_registry

    cls = TestClippedPGExample
    reg = load_registry(cls.extra_plugins)
    c = 1e-4  # a Flow-GRPO-sized clip range: the log-probs are means over latent dims, so ratios stay near 1
    algo = EXAMPLE.ClippedPG(clip_range=c)
    policy = reg.get("policy", "toy").create({"size": 8, "hidden": 16})
    sampler = reg.get("sampler", "flow-sde").create({"steps": 4})
    batch = cls.make_batch(algo, policy, sampler)
    with torch.no_grad():
        for p in policy.trainable_parameters():  # the policy moves away from the one that sampled
            p.mul_(1.05)
    unit = algo.units(batch)[0]
    out = algo.loss(policy, sampler, batch, unit)
    new = sampler.log_prob(policy, batch.trajectory, unit, batch.cond).log_prob.detach().tolist()
    old = batch.trajectory.log_probs[:, unit].tolist()
    adv = batch.advantages.tolist()
    want = []
    for n, o, a in zip(new, old, adv, strict=True):
        r = math.exp(n - o)
        want.append(max(-a * r, -a * min(max(r, 1 - c), 1 + c)))
    torch.testing.assert_close(out.loss.detach(), torch.tensor(want), rtol=1e-5, atol=1e-6)
    ratios = [math.exp(n - o) for n, o in zip(new, old)]
    assert float(out.metrics["pg/clipfrac"]) == sum(abs(r - 1) > c for r in ratios) / len(ratios)
    assert 0 < float(out.metrics["pg/clipfrac"]) < 1  # the update moved some rows outside the clip range
