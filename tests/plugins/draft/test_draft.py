"""draft's loss and gradient against a hand-written rollout, decode and reward; finite differences; errors."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from flowfactory.errors import FlowFactoryError
from flowfactory.plugins import load
from flowfactory.registry import BuildContext
from flowfactory.testing import make_generators
from flowfactory.testing.toy import ToyPolicy
from flowfactory.train.rewards import RewardSet
from flowfactory.types import TrainBatch

PROMPTS = ["a red square", "a blue car", "a green tree"]
TARGETS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.8, 0.0]])
W_BRIGHT, W_COLOUR, TOL = 0.5, 2.0, 0.5
STEPS = 4


@pytest.fixture(scope="module")
def registry():
    return load(strict=True).registry


def build(registry, **options):
    return registry.get("optimizer", "draft").create(options, BuildContext(seed=0))


def reward_set(registry, names=(("brightness", {}, W_BRIGHT), ("colour-match", {"tolerance": TOL}, W_COLOUR))):
    return RewardSet([(n, registry.get("reward", n).create(o, BuildContext()), w) for n, o, w in names])


@pytest.fixture(scope="module")
def setup(registry):
    policy = ToyPolicy(seed=3, size=4, hidden=8)
    sampler = registry.get("sampler", "ode").create({"steps": STEPS}, BuildContext())
    cond = policy.encode(PROMPTS)
    n = len(PROMPTS)
    traj = sampler.rollout(policy, cond, policy.noise(make_generators(range(n))), make_generators(range(n)),
                           keep="steps", deterministic=True)
    batch = TrainBatch(trajectory=traj, cond=cond, advantages=torch.zeros(n), fresh=True,
                       sample_keys=tuple((1, 0, i) for i in range(n)), group_ids=torch.arange(n), prompts=PROMPTS)
    return policy, sampler, batch


def hand_reward(x: torch.Tensor) -> torch.Tensor:
    """The toy decode, brightness (Rec. 601 luma) and colour match written out; the weighted sum, [B]."""
    img = (x / 2 + 0.5).clamp(0, 1)
    bright = (0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]).mean(dim=(1, 2))
    d2 = ((img - TARGETS[:, :, None, None]) ** 2).sum(1)
    colour = torch.exp(-math.log(2.0) * d2 / TOL**2).mean(dim=(1, 2))
    return W_BRIGHT * bright + W_COLOUR * colour


def euler(policy, x, sigmas, i, text):
    v = policy.net(x, sigmas[i].expand(x.shape[0]), text)
    return x + (sigmas[i + 1] - sigmas[i]) * v


def hand_draft_loss(policy, batch, k):
    """-reward of a K-step Euler rollout from the stored state x_{S-K}, with grad."""
    traj, text = batch.trajectory, batch.cond["text"]
    x = traj.latents[:, STEPS - k].clone()
    for i in range(STEPS - k, STEPS):
        x = euler(policy, x, traj.sigmas, i, text)
    return -hand_reward(x)


def loss_and_grads(fn, policy):
    params = policy.trainable_parameters()
    loss = fn()
    grads = torch.autograd.grad(loss.mean(), params)
    return loss.detach(), grads


def max_grad_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_draft_k_equals_a_hand_written_rollout(registry, setup, k, checkpointing):
    policy, sampler, batch = setup
    algo = build(registry, k=k, checkpointing=checkpointing)
    algo.bind_rewards(reward_set(registry))
    assert algo.units(batch) == [0]
    out = algo.loss(policy, sampler, batch, 0)
    assert float(out.max_metrics["draft/agreement"]) < 1e-6  # the re-run lands on the stored final state
    ours, g_ours = loss_and_grads(lambda: algo.loss(policy, sampler, batch, 0).loss, policy)
    hand, g_hand = loss_and_grads(lambda: hand_draft_loss(policy, batch, k), policy)
    assert float((ours - hand).abs().max()) < 1e-6
    assert max_grad_diff(g_ours, g_hand) < 1e-6
    assert max(float(g.abs().max()) for g in g_hand) > 1e-3  # a real gradient, not two zeros
    assert float(out.metrics["draft/reward"]) == pytest.approx(float(-hand.mean()), abs=1e-6)


def test_gradient_equals_finite_differences(registry, setup):
    """The directional derivative along a random direction of every trained parameter, against a central
    difference of the loss (float32: h = 1e-2)."""
    policy, sampler, batch = setup
    algo = build(registry, k=2)
    algo.bind_rewards(reward_set(registry))
    params = policy.trainable_parameters()
    gen = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=gen) for p in params]
    norm = math.sqrt(sum(float((d**2).sum()) for d in direction))
    direction = [d / norm for d in direction]
    _, grads = loss_and_grads(lambda: algo.loss(policy, sampler, batch, 0).loss, policy)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction))
    h = 1e-2

    def shifted(scale):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(scale * d)
            value = float(algo.loss(policy, sampler, batch, 0).loss.mean())
            for p, d in zip(params, direction):
                p.sub_(scale * d)
            return value

    numeric = (shifted(h) - shifted(-h)) / (2 * h)
    assert abs(analytic) > 1e-3
    assert numeric == pytest.approx(analytic, rel=2e-2)


def test_refl_at_the_last_step_is_draft_1(registry, setup):
    policy, sampler, batch = setup
    refl = build(registry, variant="refl", k=1)
    draft = build(registry, k=1)
    for a in (refl, draft):
        a.bind_rewards(reward_set(registry))
    a_loss, a_grads = loss_and_grads(lambda: refl.loss(policy, sampler, batch, 0).loss, policy)
    b_loss, b_grads = loss_and_grads(lambda: draft.loss(policy, sampler, batch, 0).loss, policy)
    assert float((a_loss - b_loss).abs().max()) < 1e-6 and max_grad_diff(a_grads, b_grads) < 1e-6


def test_refl_predicts_the_clean_latent_at_a_keyed_late_step(registry, setup):
    policy, sampler, batch = setup
    algo = build(registry, variant="refl", k=3)
    algo.bind_rewards(reward_set(registry))
    t = algo.refl_steps(batch, STEPS)
    assert t.tolist() == algo.refl_steps(batch, STEPS).tolist() and all(1 <= s <= 3 for s in t.tolist())
    assert algo.refl_steps(batch.select([2]), STEPS).tolist() == t[2:].tolist()  # a row's draw follows its key
    many = batch.select([0] * 40)
    many.sample_keys = tuple((5, 0, i) for i in range(40))
    assert set(algo.refl_steps(many, STEPS).tolist()) == {1, 2, 3}

    def hand():
        traj = batch.trajectory
        x_t = traj.latents[torch.arange(len(t)), t]
        sigma = traj.sigmas[t]
        x0 = x_t - sigma[:, None, None, None] * policy.net(x_t, sigma, batch.cond["text"])
        return -hand_reward(x0)

    ours, g_ours = loss_and_grads(lambda: algo.loss(policy, sampler, batch, 0).loss, policy)
    theirs, g_theirs = loss_and_grads(hand, policy)
    assert float((ours - theirs).abs().max()) < 1e-6 and max_grad_diff(g_ours, g_theirs) < 1e-6


def test_draft_lv_renoises_the_final_sample(registry, setup):
    policy, sampler, batch = setup
    algo = build(registry, variant="draft-lv", lv_samples=3)
    algo.bind_rewards(reward_set(registry))
    assert algo.units(batch) == [0, 1, 2]
    traj = batch.trajectory
    s = traj.sigmas[STEPS - 1]
    noises = [algo.lv_noise(batch, j) for j in range(3)]
    assert not torch.equal(noises[0], noises[1])
    assert torch.equal(algo.lv_noise(batch.select([1]), 2), noises[2][1:2])
    for j in range(3):
        def hand(j=j):
            x_in = (1 - s) * traj.final + s * noises[j]
            return -hand_reward(euler(policy, x_in, traj.sigmas, STEPS - 1, batch.cond["text"]))

        ours, g_ours = loss_and_grads(lambda j=j: algo.loss(policy, sampler, batch, j).loss, policy)
        theirs, g_theirs = loss_and_grads(hand, policy)
        assert float((ours - theirs).abs().max()) < 1e-6 and max_grad_diff(g_ours, g_theirs) < 1e-6


def test_a_non_differentiable_reward_is_refused_by_name(registry):
    algo = build(registry)
    with pytest.raises(FlowFactoryError, match=r"rewards\[1\]\.name: reward 'jpeg-compressibility' is not differentiable"):
        algo.bind_rewards(reward_set(registry, (("brightness", {}, 1.0), ("jpeg-compressibility", {}, 1.0))))


def test_a_groupwise_reward_is_refused(registry):
    class GroupMean:
        groupwise = True
        handles_video = False
        differentiable = True

        def score(self, samples):
            return samples.images.mean(dim=(1, 2, 3))

    with pytest.raises(FlowFactoryError, match=r"rewards\[0\]\.name: reward 'group-mean' compares"):
        build(registry).bind_rewards(RewardSet([("group-mean", GroupMean(), 1.0)]))


def test_options_and_sampler_checks(registry):
    with pytest.raises(ValidationError, match="k: 1"):
        build(registry, variant="draft-lv", k=2)
    algo = build(registry, k=5)
    sampler = registry.get("sampler", "ode").create({"steps": 4}, BuildContext())
    assert "k=5 differentiated steps exceed the sampler's 4 steps" in algo.check_sampler(sampler)
    with pytest.raises(FlowFactoryError, match="k=5"):
        algo.setup(ToyPolicy(size=4, hidden=8), sampler)
