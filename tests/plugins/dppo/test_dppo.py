"""Flow-DPPO's loss and gradient against the formula written out here (the flow-sde step's Gaussian, its KL and
the trust-region mask, computed from the toy network's velocities), the mask's four cases, the fresh batch, the
KL normalisations and the reference KL, and the errors."""

from __future__ import annotations

import copy
import math

import pydantic
import pytest
import torch

from flowfactory.errors import FlowFactoryError
from flowfactory.registry import BuildContext
from flowfactory.testing import load_registry
from flowfactory.testing.contracts import make_generators
from flowfactory.types import TrainBatch
from flowfactory_dppo import DPPOOptions
from flowfactory_dppo.loss import DPPO, dppo_policy_loss

N, STEPS, NOISE = 6, 4, 0.7


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture
def setting(registry):
    """(policy, sampler, rollout batch) on the toy policy with flow-sde."""
    policy = registry.get("policy", "toy").create({"size": 8, "hidden": 16}, BuildContext(seed=0))
    sampler = registry.get("sampler", "flow-sde").create({"steps": STEPS, "noise_level": NOISE}, BuildContext(seed=0))
    prompts = ["a red square"] * 3 + ["a blue circle"] * 3
    cond = policy.encode(prompts)
    with torch.no_grad():
        traj = sampler.rollout(policy, cond, policy.noise(make_generators(range(N))),
                               make_generators(range(50, 50 + N)), keep="steps")
    batch = TrainBatch(trajectory=traj, cond=cond, advantages=torch.zeros(N), fresh=True,
                       sample_keys=tuple((1, 0, i) for i in range(N)))
    return policy, sampler, batch


def make(**options) -> DPPO:
    return DPPO(DPPOOptions(**options))


@torch.no_grad()
def perturb(params, size: float = 0.05, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * size)


def hand_step(net, batch: TrainBatch, i: int):
    """(mean [B, *latent], std) of Flow-GRPO's SDE step i, from the formula (docs/algorithms.md, flow-sde)."""
    traj = batch.trajectory
    x = traj.latents[:, i].float()
    sigma, sigma_next, sigma_1 = (float(traj.sigmas[j]) for j in (i, i + 1, 1))
    dt = sigma_next - sigma
    std_t = NOISE * math.sqrt(sigma / (1 - (sigma_1 if sigma >= 1 else sigma)))
    v = net(x, torch.full((len(x),), sigma), batch.cond["text"])
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_t * math.sqrt(-dt)


def hand_log_prob(x_next, mean, s):
    return (-((x_next - mean) ** 2) / (2 * s**2) - math.log(s) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)


def hand_loss(new_net, old_net, batch, i, adv, tau, normalization="step"):
    """Per-sample Flow-DPPO loss [B] and which samples it drops, written from the formula."""
    mean, s = hand_step(new_net, batch, i)
    with torch.no_grad():
        mean_old, _ = hand_step(old_net, batch, i)
    lp = hand_log_prob(batch.trajectory.latents[:, i + 1].float(), mean, s)
    r = torch.exp(lp - batch.trajectory.log_probs[:, i])
    denom = 2 * s**2 if normalization == "step" else 2.0
    kl = ((mean.detach() - mean_old) ** 2).flatten(1).mean(1) / denom
    drop = (kl >= tau) & (((r > 1) & (adv > 0)) | ((r < 1) & (adv < 0)))
    return torch.where(drop, torch.zeros(()), -adv * r), drop, kl, r


def grads(params):
    out = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


@pytest.mark.parametrize("normalization", ["step", "none"])
def test_loss_and_gradient_after_an_update_match_the_formula(setting, normalization):
    policy, sampler, batch = setting
    opt = make(kl_normalization=normalization)
    opt.setup(policy, sampler)
    opt.on_rollout(policy)
    old_net = copy.deepcopy(policy.net).requires_grad_(False)
    params = policy.trainable_parameters()
    perturb(params, 0.05)
    i = batch.trajectory.stochastic_steps()[1]
    # advantages: half move with the ratio (the mask may drop them), half against it (always kept)
    with torch.no_grad():
        _, _, kl, r = hand_loss(policy.net, old_net, batch, i, torch.ones(N), 0.0, normalization)
    sign = torch.sign(r - 1)
    adv = torch.tensor([1.0, 0.5, 2.0, -1.0, -0.5, -2.0]).abs() * sign
    adv[3:] = -adv[3:]
    low = kl[:3].sort().values
    tau = float(low[0] + low[1]) / 2  # of the rows moving with their advantage, two are outside the region
    b = batch.select(slice(None), fresh=False)
    b.advantages = adv

    expected, drop, _, _ = hand_loss(policy.net, old_net, b, i, adv, tau, normalization)
    expected.sum().backward()
    want = grads(params)
    opt.options = DPPOOptions(kl_threshold=tau, kl_normalization=normalization)
    out = opt.loss(policy, sampler, b, i)
    out.loss.sum().backward()
    got = grads(params)

    assert 0 < int(drop.sum()) < 3 and not bool(drop[3:].any())  # dropped: only moves with the advantage
    err = (out.loss - expected).abs().max().item()
    assert err < 1e-5, err
    gerr = max((a - c).abs().max().item() for a, c in zip(got, want))
    assert gerr < 1e-5 * max(c.abs().max().item() for c in want), gerr
    assert float(out.metrics["dppo/masked_frac"]) == pytest.approx(float(drop.float().mean()))


def test_fresh_batch_is_the_unmasked_policy_gradient(setting):
    """On the first optimizer step the policy is the sampling one: D = 0, nothing is masked, r = 1 and the
    gradient is -A grad l_theta."""
    policy, sampler, batch = setting
    opt = make(kl_threshold=0.0)
    opt.on_rollout(policy)
    params = policy.trainable_parameters()
    adv = torch.tensor([2.0, -1.0, 0.5, -0.5, 1.0, -2.0])
    batch.advantages = adv
    i = batch.trajectory.stochastic_steps()[0]
    mean, s = hand_step(policy.net, batch, i)
    lp = hand_log_prob(batch.trajectory.latents[:, i + 1].float(), mean, s)
    (-adv * lp).sum().backward()
    want = grads(params)
    out = opt.loss(policy, sampler, batch, i)
    out.loss.sum().backward()
    got = grads(params)
    assert float(out.metrics["dppo/kl"]) == 0.0 and float(out.metrics["dppo/masked_frac"]) == 0.0
    torch.testing.assert_close(out.loss, -adv, atol=1e-4, rtol=0)
    assert float(out.max_metrics["logprob/agreement"]) < 1e-5
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-3)


def test_the_mask_drops_only_moves_outside_the_region_that_go_with_the_advantage():
    mean_old = torch.zeros(8, 2)
    far, near = torch.full((2,), 1.0), torch.full((2,), 0.01)
    mean = torch.stack([far, far, far, far, near, near, near, near])
    lp = torch.tensor([0.1, -0.1, 0.1, -0.1, 0.1, -0.1, 0.1, -0.1])  # r > 1, r < 1, ...
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0])
    loss, d = dppo_policy_loss(lp, torch.zeros(8), mean, mean_old, 0.5, adv, threshold=0.01)
    # KL = mean (d^2) / (2 s^2): 1 / 0.5 = 2 far, 1e-4 / 0.5 = 2e-4 near
    torch.testing.assert_close(d["kl"], torch.tensor([2.0] * 4 + [2e-4] * 4))
    assert d["drop"].tolist() == [True, True, False, False, False, False, False, False]
    torch.testing.assert_close(loss, torch.where(d["drop"], torch.zeros(()), -adv * torch.exp(lp)))
    # unnormalised: D = mean(d^2) / 2
    _, d2 = dppo_policy_loss(lp, torch.zeros(8), mean, mean_old, 0.5, adv, threshold=0.01, normalization="none")
    torch.testing.assert_close(d2["kl"], torch.tensor([0.5] * 4 + [5e-5] * 4))


def test_reference_kl_term(setting):
    policy, sampler, batch = setting
    opt = make(kl_beta=0.5)
    assert opt.requirements.reference and not make().requirements.reference
    opt.on_rollout(policy)
    perturb(policy.trainable_parameters(), 0.05, seed=3)
    i = batch.trajectory.stochastic_steps()[0]
    out = opt.loss(policy, sampler, batch, i)
    plain = make().loss(policy, sampler, batch, i)
    mean, s = hand_step(policy.net, batch, i)
    with torch.no_grad():
        ref_mean, _ = hand_step(policy._frozen, batch, i)
    kl = ((mean - ref_mean) ** 2).flatten(1).mean(1).detach() / (2 * s**2)
    torch.testing.assert_close(out.loss - plain.loss, 0.5 * kl, atol=1e-5, rtol=1e-4)
    assert float(out.metrics["dppo/kl_ref"].detach()) == pytest.approx(float(kl.mean()), rel=1e-4)


def test_errors(registry, setting):
    policy, sampler, batch = setting
    with pytest.raises(FlowFactoryError, match="stochastic sampler"):
        make().setup(policy, registry.get("sampler", "ode").create({"steps": 4}, BuildContext(seed=0)))
    with pytest.raises(FlowFactoryError, match="on_rollout"):
        make().loss(policy, sampler, batch.select(slice(None), fresh=False), batch.trajectory.stochastic_steps()[0])
    with pytest.raises(pydantic.ValidationError):
        DPPOOptions(kl_threshold=-1.0)
    with pytest.raises(pydantic.ValidationError):
        DPPOOptions(kl_normalization="flow-grpo")
