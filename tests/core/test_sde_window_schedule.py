"""MixGRPO's sliding SDE window (`sde_window_schedule: {type: sliding, ...}` on every SDE sampler).

The schedule is checked against MixGRPO's training loop written out here as the reference runs it: a left
boundary `l` that starts at the first position, is read at every training iteration (one epoch here), and
after every `every_epochs`-th iteration moves by `stride`; past the last position it goes back to the first
(`restart`, the reference's --roll_back) or is clamped to the last (min(l + s, last start)).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError

from flowfactory.registry import BuildContext, Registry
from flowfactory.testing import SamplerContract, load_registry, make_generators


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry()


def build(registry: Registry, name: str, seed: int = 0, **options: Any):
    return registry.get("sampler", name).create(options, BuildContext(seed=seed))


def window(mask: torch.Tensor) -> list[int]:
    return [int(i) for i in mask.nonzero().flatten()]


def simulated_starts(epochs: int, first: int, last_start: int, stride: int, interval: int,
                     restart: bool) -> list[int]:
    """The window's left boundary at epochs 1..epochs, iterating MixGRPO's stateful update."""
    left, out = first, []
    for iteration in range(1, epochs + 1):
        out.append(left)  # this iteration samples and trains with the current window
        if iteration % interval == 0:
            left += stride
            if left > last_start:
                left = first if restart else last_start
    return out


SCHEDULES = [  # (steps, size, stride, every_epochs, restart, sde_window_range)
    (10, 2, 1, 3, True, None),
    (10, 2, 1, 3, False, None),
    (8, 3, 2, 2, True, None),     # starts 0, 2, 4 (4 is the last where 3 steps fit before the last step)
    (10, 2, 3, 1, False, None),   # 0, 3, 6, then clamped at 7, the last start, though 7 - 0 is no multiple of 3
    (10, 2, 3, 1, True, None),    # 0, 3, 6, then back to 0: 9 is past the last start
    (12, 4, 1, 5, True, (2, 6)),  # slides over the given range only
    (25, 4, 1, 25, True, None),   # the reference's FLUX setting: 25 steps, w = 4, tau = 25, s = 1
]


@pytest.mark.parametrize("steps,size,stride,every,restart,rng", SCHEDULES)
def test_window_follows_mixgrpo_schedule(registry: Registry, steps: int, size: int, stride: int, every: int,
                                         restart: bool, rng: tuple[int, int] | None) -> None:
    options: dict[str, Any] = {"steps": steps, "sde_window_size": size,
                               "sde_window_schedule": {"type": "sliding", "stride": stride, "every_epochs": every,
                                                       "restart": restart}}
    if rng is not None:
        options["sde_window_range"] = rng
    sampler = build(registry, "flow-sde", **options)
    first, last_start = (rng[0], rng[1] - 1) if rng else (0, steps - 1 - size)  # the last step stays ODE
    epochs = 3 * every * (last_start - first + 2)
    expected = simulated_starts(epochs, first, last_start, stride, every, restart)
    got = []
    for epoch in range(1, epochs + 1):
        idx = window(sampler.stochastic_mask(epoch))
        assert idx == list(range(idx[0], idx[0] + size)), f"epoch {epoch}: not {size} consecutive steps: {idx}"
        assert idx[-1] < steps - 1
        got.append(idx[0])
    assert got == expected
    assert got[0] == first and max(got) <= last_start
    assert window(sampler.stochastic_mask(0)) == window(sampler.stochastic_mask(1))  # epoch 0: the first window


def test_schedule_examples_written_out(registry: Registry) -> None:
    """Two schedules spelled out by hand: 8 steps, a window of 2, moved by 1 every 2 epochs."""
    opts = {"steps": 8, "sde_window_size": 2}
    sliding = build(registry, "flow-sde", **opts, sde_window_schedule={"type": "sliding", "every_epochs": 2})
    assert [window(sliding.stochastic_mask(e))[0] for e in range(1, 16)] == [
        0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 0, 0, 1]
    clamped = build(registry, "flow-sde", **opts,
                    sde_window_schedule={"type": "sliding", "every_epochs": 2, "restart": False})
    assert [window(clamped.stochastic_mask(e))[0] for e in range(9, 17)] == [4, 4, 5, 5, 5, 5, 5, 5]


def test_window_may_slide_onto_a_stochastic_last_step(registry: Registry) -> None:
    sampler = build(registry, "flow-sde", steps=5, sde_window_size=2, deterministic_last_step=False,
                    sde_window_schedule={"type": "sliding", "every_epochs": 1})
    assert [window(sampler.stochastic_mask(e)) for e in range(1, 6)] == [[0, 1], [1, 2], [2, 3], [3, 4], [0, 1]]


def test_window_does_not_depend_on_the_seed(registry: Registry) -> None:
    opts = {"steps": 10, "sde_window_size": 2, "sde_window_schedule": {"type": "sliding", "every_epochs": 2}}
    a, b = build(registry, "flow-sde", seed=0, **opts), build(registry, "flow-sde", seed=7, **opts)
    assert all(torch.equal(a.stochastic_mask(e), b.stochastic_mask(e)) for e in range(30))


@pytest.mark.parametrize("name,extra", [("dance-sde", {"eta": 0.5}), ("cps", {"noise_level": 0.5})])
def test_every_sde_sampler_slides_the_same_window(registry: Registry, name: str, extra: dict[str, Any]) -> None:
    opts = {"steps": 9, "sde_window_size": 3, "sde_window_schedule": {"type": "sliding", "every_epochs": 2}}
    ref, sampler = build(registry, "flow-sde", **opts), build(registry, name, **opts, **extra)
    assert all(torch.equal(sampler.stochastic_mask(e), ref.stochastic_mask(e)) for e in range(30))


@pytest.mark.parametrize("options,match", [
    ({"steps": 8, "sde_window_schedule": {"type": "sliding"}}, "needs sde_window_size"),
    ({"steps": 8, "sde_window_size": 2, "sde_window_schedule": {"type": "random"}}, "sliding"),
    ({"steps": 8, "sde_window_size": 2, "sde_window_schedule": {"type": "sliding", "stride": 0}}, "greater than"),
    ({"steps": 8, "sde_window_size": 2, "sde_window_schedule": {"type": "sliding", "every_epochs": 0}},
     "greater than"),
    ({"steps": 8, "sde_window_size": 2, "sde_window_schedule": {"every_epochs": 2}}, "type"),
    ({"steps": 8, "sde_window_size": 2, "sde_window_schedule": {"type": "sliding", "size": 2}}, "size"),
    ({"steps": 8, "sde_window_size": 2, "sde_window_range": (5, 7),
      "sde_window_schedule": {"type": "sliding"}}, "hi \\+ size - 1"),
])
def test_invalid_schedules_are_config_errors(registry: Registry, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        registry.get("sampler", "flow-sde").options(**options)


def rollout(sampler: Any, policy: Any, epoch: int):
    prompts = ["a red square", "a blue circle", "a green triangle"]
    cond = policy.encode(prompts)
    noise = policy.noise(make_generators([100 + i for i in range(3)]))
    return sampler.rollout(policy, cond, noise, make_generators([200 + i for i in range(3)]), epoch=epoch)


@pytest.mark.parametrize("name", ["flow-sde", "dance-sde"])
def test_rollout_equals_the_sampler_with_the_window_pinned_there(registry: Registry, name: str) -> None:
    """At every epoch the sliding rollout is bit-identical to the same sampler whose (random) window can
    only start where the sliding one is: the schedule changes which steps are stochastic, nothing else."""
    policy = registry.get("policy", "toy").create({"size": 8, "hidden": 16, "shift": 3.0}, BuildContext(seed=0))
    sliding = build(registry, name, steps=7, sde_window_size=2,
                    sde_window_schedule={"type": "sliding", "every_epochs": 2})
    seen = set()
    for epoch in range(1, 12, 2):
        start = window(sliding.stochastic_mask(epoch))[0]
        seen.add(start)
        pinned = build(registry, name, steps=7, sde_window_size=2, sde_window_range=(start, start + 1))
        a, b = rollout(sliding, policy, epoch), rollout(pinned, policy, epoch)
        assert torch.equal(a.stochastic, b.stochastic)
        assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert seen == {0, 1, 2, 3, 4}


def test_a_window_over_every_step_equals_plain_flow_sde(registry: Registry) -> None:
    """A window as wide as the stochastic steps leaves one position: the rollout is plain flow-sde's."""
    policy = registry.get("policy", "toy").create({"size": 8, "hidden": 16}, BuildContext(seed=0))
    sliding = build(registry, "flow-sde", steps=6, sde_window_size=5,
                    sde_window_schedule={"type": "sliding", "every_epochs": 1})
    plain = build(registry, "flow-sde", steps=6)
    for epoch in (1, 2, 5):
        a, b = rollout(sliding, policy, epoch), rollout(plain, policy, epoch)
        assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)


class TestFlowSDESlidingWindowContract(SamplerContract):
    component = "flow-sde"
    options = {"steps": 6, "sde_window_size": 2, "sde_window_schedule": {"type": "sliding", "every_epochs": 1}}
    epochs = (0, 1, 2, 3, 4, 5)  # every position (0..3) and the restart


class TestCPSSlidingWindowClampedContract(SamplerContract):
    component = "cps"
    options = {"steps": 6, "sde_window_size": 2, "noise_level": 0.5,
               "sde_window_schedule": {"type": "sliding", "stride": 2, "every_epochs": 1, "restart": False}}
    policy_options = {"size": 8, "hidden": 16, "shift": 3.0}
    epochs = (1, 2, 3)
