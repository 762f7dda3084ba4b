"""GRPO's loss against a hand computation of Flow-GRPO's objective."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch

from flowfactory.errors import FlowFactoryError
from flowfactory.plugins import load
from flowfactory.registry import BuildContext
from flowfactory.types import StepDistribution, TrainBatch, Trajectory


def build(**options):
    return load(strict=True).registry.get("optimizer", "grpo").create(options, BuildContext())


class FixedSampler:
    """A sampler double whose step distribution is given: mean = x * w (w carries the grad)."""

    stochastic = True

    def __init__(self, new_log_prob: torch.Tensor, std: float):
        self.w = torch.nn.Parameter(torch.ones(()))
        self.new_log_prob = new_log_prob
        self.std = std
        self.ref_mean_scale = 0.5

    def step_distribution(self, policy, x, sigmas, i, cond, stochastic=True):
        scale = self.ref_mean_scale if policy.in_reference else self.w
        return StepDistribution(mean=x * scale, std=torch.tensor(self.std))

    def log_prob(self, policy, trajectory, step, cond):
        d = self.step_distribution(policy, trajectory.latents[:, step], trajectory.sigmas, step, cond)
        d.log_prob = self.new_log_prob * self.w
        return d


class DoublePolicy:
    in_reference = False

    @contextmanager
    def reference(self):
        self.in_reference = True
        try:
            yield
        finally:
            self.in_reference = False


def make_batch(old: torch.Tensor, adv: torch.Tensor, fresh: bool = True) -> TrainBatch:
    b = old.shape[0]
    latents = torch.arange(b * 3 * 4, dtype=torch.float32).view(b, 3, 4) / 10
    log_probs = torch.zeros(b, 2)
    log_probs[:, 0] = old
    traj = Trajectory(sigmas=torch.tensor([1.0, 0.5, 0.0]), stochastic=torch.tensor([True, False]),
                      final=latents[:, -1], latents=latents, log_probs=log_probs)
    return TrainBatch(trajectory=traj, cond={}, advantages=adv, fresh=fresh)


def hand_loss(new, old, adv, clip, adv_clip):
    out = []
    for n, o, a in zip(new.tolist(), old.tolist(), adv.tolist()):
        a = max(-adv_clip, min(adv_clip, a))
        r = math.exp(n - o)
        out.append(max(-a * r, -a * min(max(r, 1 - clip), 1 + clip)))
    return torch.tensor(out)


@pytest.mark.parametrize("clip", [1e-4, 0.2])
def test_clipped_objective_matches_hand_computation(clip):
    old = torch.tensor([-1.0, -1.0, -0.5, -2.0])
    new = torch.tensor([-0.9, -1.3, -0.5, -2.00001])
    adv = torch.tensor([1.5, -2.0, 0.7, 9.0])  # the last one is clipped to adv_clip=5
    grpo = build(clip_range=clip, adv_clip=5.0)
    sampler = FixedSampler(new, std=0.3)
    out = grpo.loss(DoublePolicy(), sampler, make_batch(old, adv), unit=0)
    torch.testing.assert_close(out.loss, hand_loss(new, old, adv, clip, 5.0), rtol=1e-6, atol=1e-7)
    ratio = torch.exp(new - old)
    assert float(out.metrics["grpo/clipfrac"]) == pytest.approx(float(((ratio - 1).abs() > clip).float().mean()))
    assert float(out.max_metrics["logprob/agreement"]) == pytest.approx(float((new - old).abs().max()))


def test_gradient_is_zero_where_the_ratio_is_clipped_against_the_advantage():
    old = torch.tensor([0.0, 0.0])
    new = torch.tensor([0.5, 0.5])  # ratio e^0.5 > 1 + clip
    grpo = build(clip_range=0.1)
    sampler = FixedSampler(new, std=0.3)
    out = grpo.loss(DoublePolicy(), sampler, make_batch(old, torch.tensor([1.0, 1.0])), unit=0)
    out.loss.sum().backward()
    assert sampler.w.grad == 0  # positive advantage, ratio above 1+c: clipped, no gradient
    sampler.w.grad = None
    out = grpo.loss(DoublePolicy(), sampler, make_batch(old, torch.tensor([-1.0, -1.0])), unit=0)
    out.loss.sum().backward()
    # negative advantage: unclipped branch is larger, d/dw of -A exp(w*new - old) at w=1 is -A*new*e^(new)
    assert float(sampler.w.grad) == pytest.approx(2 * 1.0 * 0.5 * math.exp(0.5), rel=1e-5)


def test_kl_to_reference_matches_gaussian_kl():
    old = torch.zeros(2)
    new = torch.zeros(2)
    std = 0.25
    grpo = build(clip_range=0.2, kl_beta=0.1)
    sampler = FixedSampler(new, std=std)
    batch = make_batch(old, torch.zeros(2))
    out = grpo.loss(DoublePolicy(), sampler, batch, unit=0)
    x = batch.trajectory.latents[:, 0]
    kl = ((x * 1.0 - x * 0.5) ** 2).mean(dim=1) / (2 * std**2)  # KL of two Gaussians sharing std
    torch.testing.assert_close(out.loss, 0.1 * kl)
    torch.testing.assert_close(out.metrics["grpo/kl"], kl.mean())


def test_agreement_only_reported_on_fresh_batches():
    grpo = build()
    sampler = FixedSampler(torch.zeros(2), std=0.3)
    out = grpo.loss(DoublePolicy(), sampler, make_batch(torch.zeros(2), torch.ones(2), fresh=False), unit=0)
    assert "logprob/agreement" not in out.max_metrics


def test_units_are_the_stochastic_steps():
    grpo = build()
    batch = make_batch(torch.zeros(2), torch.ones(2))
    assert grpo.units(batch) == [0]


def test_deterministic_sampler_is_rejected_with_the_fix():
    grpo = build()
    ode = load(strict=True).registry.get("sampler", "ode").create({"steps": 4}, BuildContext())
    with pytest.raises(FlowFactoryError, match="sampler.name.*flow-sde"):
        grpo.setup(object(), ode)


def test_options_are_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        build(clip_range=-1.0)
    with pytest.raises(ValidationError):
        build(clip=0.2)


def test_validate_rejects_grpo_with_a_deterministic_sampler(tmp_path):
    """A config pairing grpo with `ode` fails validation (before any weights load), naming the key and fix."""
    from flowfactory.config import load as load_config
    from flowfactory.errors import ConfigError

    path = tmp_path / "run.yaml"
    path.write_text("policy: {name: flux, options: {preset: tiny}}\nsampler: {name: ode}\n"
                    "rewards: [{name: brightness}]\noptimizer: {name: grpo}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == [("sampler.name", "optimizer 'grpo' needs a stochastic sampler with "
                                   "log-probabilities, but 'ode' is deterministic; use e.g. `flow-sde`")]
