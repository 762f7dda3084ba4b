"""DiffusionNFT's loss, time sampling, old-policy EMA and state against independent computations."""

from __future__ import annotations

import copy

import pytest
import torch

from flowfactory.errors import FlowFactoryError
from flowfactory.plugins import load
from flowfactory.registry import BuildContext
from flowfactory.testing.toy import ToyPolicy
from flowfactory.types import TrainBatch, Trajectory
from flowfactory_nft.loss import NFT, draw_times, nft_loss, old_decay, optimality, shift_times

TIMES = torch.tensor([1e-4, 0.02, 0.5, 0.98, 1.0])


def build(seed: int = 0, **options) -> NFT:
    return load(strict=True).registry.get("optimizer", "nft").create(options, BuildContext(seed=seed))


def paper_loss(v_theta, v_old, x0, eps, t, adv, beta, c):
    """The paper's objective in velocity space, written independently of the plugin: with v* = eps - x0,
    the data prediction error of an implicit policy v is t (v* - v), so the adaptively weighted x0 loss is
    t^2 mean (v - v*)^2 / max(t mean |v - v*|, 1e-5)."""
    target = eps - x0
    r = (torch.clamp(adv, -c, c) / c + 1) / 2
    out = []
    for i in range(len(t)):
        vp = (1 - beta) * v_old[i] + beta * v_theta[i]
        vn = (1 + beta) * v_old[i] - beta * v_theta[i]
        terms = []
        for v in (vp, vn):
            d = (v - target[i]).double()
            terms.append(float(t[i]) ** 2 * (d**2).mean() / max(float(t[i]) * float(d.abs().mean()), 1e-5))
        out.append(c / beta * (r[i] * terms[0] + (1 - r[i]) * terms[1]))
    return torch.stack(out).float()


def tensors(b: int = 5, shape=(3, 4, 4)):
    g = torch.Generator().manual_seed(1)
    x0, eps, v_theta, v_old = (torch.randn(b, *shape, generator=g) for _ in range(4))
    return x0, eps, v_theta, v_old


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_loss_matches_the_paper_formula(beta):
    x0, eps, v_theta, v_old = tensors()
    t = TIMES
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    adv = torch.tensor([-7.0, -1.0, 0.0, 2.0, 5.0])
    loss, _ = nft_loss(v_theta, v_old, x0, xt, t, adv, beta, 5.0)
    assert loss.dtype == torch.float32 and loss.shape == (5,)
    torch.testing.assert_close(loss, paper_loss(v_theta, v_old, x0, eps, t, adv, beta, 5.0), rtol=2e-4, atol=1e-6)


def test_equal_policies_give_the_weighted_flow_matching_loss_and_a_signed_gradient():
    x0, eps, v, _ = tensors()
    t = TIMES
    tb = t.view(-1, 1, 1, 1)
    xt = (1 - tb) * x0 + tb * eps
    target = eps - x0
    d = (v - target).double()
    weight = (tb.double() * d.abs().mean(dim=(1, 2, 3), keepdim=True)).clamp(min=1e-5)
    fm = (tb.double() ** 2 * d**2 / weight).mean(dim=(1, 2, 3)).float()  # adaptively weighted FM loss
    beta, c = 0.3, 2.0
    for adv in (torch.full((5,), -3.0), torch.zeros(5), torch.linspace(-1, 1, 5)):
        v_theta = v.clone().requires_grad_(True)
        loss, parts = nft_loss(v_theta, v.clone(), x0, xt, t, adv, beta, c)
        torch.testing.assert_close(parts["positive"], parts["negative"])  # v+ = v- = v
        torch.testing.assert_close(loss, c / beta * fm, rtol=1e-5, atol=1e-7)
        # d loss / d v_theta = c / beta * (r beta - (1 - r) beta) dFM/dv = c (2r - 1) dFM/dv
        loss.sum().backward()
        v_fm = v.clone().requires_grad_(True)
        _, p = nft_loss(v_fm, v.clone(), x0, xt, t, torch.full((5,), c), 1.0, c)  # r = 1, beta = 1: L+ of v
        p["positive"].sum().backward()
        r = optimality(adv, c).view(-1, 1, 1, 1)
        torch.testing.assert_close(v_theta.grad, c * (2 * r - 1) * v_fm.grad, rtol=1e-4, atol=1e-7)


def test_optimality_probability_mapping():
    adv = torch.tensor([-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 10.0])
    assert optimality(adv, 5.0).tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert optimality(torch.tensor([0.5]), 1.0).item() == 0.75


def test_uniform_logit_normal_and_shift():
    o = build(time_sampling="uniform").options
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    t = draw_times(o, 4000, 2, torch.tensor([1.0, 0.0]), g())
    assert t.shape == (4000, 2) and t.dtype == torch.float32 and t.min() >= 0 and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.02
    shifted = draw_times(build(time_sampling="uniform", time_shift=3.0).options, 4000, 2, torch.tensor([1.0, 0.0]), g())
    torch.testing.assert_close(shifted, shift_times(t.double(), 3.0).float())
    assert shifted.mean() > 0.6 and (shifted >= t).all()  # s > 1 moves times toward noise
    assert shift_times(torch.tensor([0.0, 0.5, 1.0]), 3.0).tolist() == [0.0, 0.75, 1.0]
    ln = draw_times(build(time_sampling="logit-normal", logit_mean=1.0, logit_std=0.5).options, 4000, 1,
                    torch.tensor([1.0, 0.0]), g())
    assert ln.min() > 0 and ln.max() < 1
    assert abs(ln.median().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.02


def test_discrete_times():
    sigmas = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    o = build().options  # discrete over the schedule
    t = draw_times(o, 50, 3, sigmas, torch.Generator().manual_seed(0))
    assert set(t.flatten().tolist()) <= set(sigmas[:-1].tolist())
    assert all(len(set(row.tolist())) == 3 for row in t)  # distinct times per rollout
    t5 = draw_times(o, 50, 5, sigmas, torch.Generator().manual_seed(0))
    assert all(sorted(row.tolist()) == sorted(sigmas[:-1].tolist()) for row in t5)  # all steps, permuted
    assert len({tuple(row.tolist()) for row in t5}) > 1  # the order varies per rollout
    even = draw_times(build(discrete_grid="even", num_times=4).options, 20, 4, sigmas, torch.Generator().manual_seed(0))
    assert all(sorted(row.tolist()) == [0.25, 0.5, 0.75, 1.0] for row in even)
    with pytest.raises(Exception, match="num_times"):
        build(discrete_grid="even")


def batch_for(policy: ToyPolicy, n: int = 4, steps: int = 4, epoch: int = 1) -> TrainBatch:
    g = torch.Generator().manual_seed(5)
    final = torch.randn(n, *policy.latent_shape, generator=g)
    traj = Trajectory(sigmas=policy.sigmas(steps), stochastic=torch.zeros(steps, dtype=torch.bool), final=final)
    return TrainBatch(trajectory=traj, cond=policy.encode(["a", "b", "c", "d"][:n]),
                      advantages=torch.tensor([-1.0, -0.2, 0.4, 1.0])[:n], fresh=True,
                      sample_keys=tuple((epoch, 0, 10 + i) for i in range(n)))


def test_units_are_drawn_per_rollout_from_its_key():
    policy = ToyPolicy(size=4, hidden=8)
    batch = batch_for(policy)
    a, b = build(seed=1), build(seed=1)
    ua1, ua2 = a.units(batch), a.units(batch)
    assert len(ua1) == 4 and all(len(u.seeds) == 4 for u in ua1)
    # the same keys draw the same times and noise, in any instance and on every call (no hidden counter)
    for x, y, z in zip(ua1, ua2, b.units(batch)):
        assert torch.equal(x.times, y.times) and torch.equal(x.times, z.times) and x.seeds == y.seeds == z.seeds
    # a rollout's draws do not depend on its micro-batch: rows 1..3 alone get rows 1..3 of the whole batch
    for whole, part in zip(ua1, a.units(batch.select(slice(1, 4)))):
        assert torch.equal(part.times, whole.times[1:]) and part.seeds == whole.seeds[1:]
    # another epoch, another run seed: other draws
    later = a.units(batch_for(policy, epoch=2))
    assert not all(torch.equal(x.times, y.times) for x, y in zip(ua1, later))
    other = build(seed=2).units(batch)
    assert {s for u in other for s in u.seeds}.isdisjoint({s for u in ua1 for s in u.seeds})


def test_loss_uses_the_old_weights_and_the_units_noise():
    torch.manual_seed(0)
    policy = ToyPolicy(size=4, hidden=8)
    nft = build(num_times=3, beta=0.5, kl_beta=0.1)
    nft.setup(policy, None)
    params = policy.trainable_parameters()
    old_net = copy.deepcopy(policy.net)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))  # trained weights moved away from the old (EMA) ones
    batch = batch_for(policy)
    before = [p.detach().clone() for p in params]
    for unit in nft.units(batch):
        out = nft.loss(policy, None, batch, unit)
        assert all(torch.equal(p, q) for p, q in zip(params, before))  # the swap restored the weights
        x0 = batch.trajectory.final
        eps = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(s))
                           for s in unit.seeds])  # row i from its own seed
        t = unit.times
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        text = batch.cond["text"]
        with torch.no_grad():
            v_old = old_net(xt, t, text)
            v_ref = policy._frozen(xt, t, text)
            v = policy.net(xt, t, text)
        expected = paper_loss(v, v_old, x0, eps, t, batch.advantages, 0.5, 5.0)
        expected = expected + 0.1 * ((v - v_ref) ** 2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(out.loss.detach(), expected, rtol=2e-4, atol=1e-6)
        assert out.loss.requires_grad


def test_decay_schedule_values():
    assert [old_decay(s, 0, 0.001, 0.5) for s in (0, 1, 100, 500, 900)] == pytest.approx([0, 0.001, 0.1, 0.5, 0.5])
    assert [old_decay(s, 75, 0.0075, 0.999) for s in (0, 74, 75, 175, 300)] == pytest.approx([0, 0, 0, 0.75, 0.999])
    assert old_decay(10, 0, 0.0, 0.0) == 0.0  # decay_type 0: the old policy is the current one


def test_old_policy_follows_the_schedule():
    policy = ToyPolicy(size=4, hidden=8)
    params = policy.trainable_parameters()
    nft = build(old_decay_rate=0.1)
    nft.setup(policy, None)
    start = [p.detach().clone() for p in params]
    steps = [[p + 0.1 * (i + 1) for p in start] for i in range(3)]  # three "optimizer steps"
    for new in steps:
        with torch.no_grad():
            for p, q in zip(params, new):
                p.copy_(q)
        nft.on_step(policy)
    assert torch.equal(nft._ema.shadow["inp.weight"], start[0])  # `epoch`: not moved by the steps
    with nft.sampling(policy):  # sampling does not move it either
        pass
    assert torch.equal(nft._ema.shadow["inp.weight"], start[0])
    nft.on_epoch_end(policy)  # moves once, with decay min(3 * 0.1, 0.5) = 0.3
    assert nft.last_decay == pytest.approx(0.3)
    for s, a, b in zip(nft._ema.shadow.values(), start, steps[-1]):
        torch.testing.assert_close(s, 0.3 * a + 0.7 * b)

    per_step = build(old_decay_rate=0.1, old_update="step")
    p2 = ToyPolicy(size=4, hidden=8)
    per_step.setup(p2, None)
    shadow = [p.detach().clone() for p in p2.trainable_parameters()]
    for i in range(3):
        with torch.no_grad():
            for p in p2.trainable_parameters():
                p.add_(0.1)
        per_step.on_step(p2)
        d = min((i + 1) * 0.1, 0.5)
        shadow = [d * s + (1 - d) * p.detach() for s, p in zip(shadow, p2.trainable_parameters())]
    per_step.on_epoch_end(p2)  # `step`: the epoch's end moves it no further
    for s, e in zip(per_step._ema.shadow.values(), shadow):
        torch.testing.assert_close(s, e)


def test_sampling_rolls_out_with_the_old_weights_and_restores_the_trained_ones():
    reg = load(strict=True).registry
    sampler = reg.get("sampler", "ode").create({"steps": 4}, BuildContext())
    policy = ToyPolicy(size=4, hidden=8)
    old_policy = ToyPolicy(size=4, hidden=8)  # same init: the old weights
    nft = build()
    nft.setup(policy, sampler)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.mul_(1.5)
    trained = [p.detach().clone() for p in policy.trainable_parameters()]
    cond = policy.encode(["x", "y"])
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    with nft.sampling(policy):
        inside = sampler.rollout(policy, cond, noise, [], keep="final", deterministic=True).final
    expected = sampler.rollout(old_policy, cond, noise, [], keep="final", deterministic=True).final
    current = sampler.rollout(policy, cond, noise, [], keep="final", deterministic=True).final
    torch.testing.assert_close(inside, expected)
    assert not torch.allclose(inside, current)
    assert all(torch.equal(p, q) for p, q in zip(policy.trainable_parameters(), trained))


def test_state_dict_round_trip():
    policy = ToyPolicy(size=4, hidden=8)
    a = build(seed=3, old_decay_rate=0.2)
    a.setup(policy, None)
    batch = batch_for(policy)
    for _ in range(3):
        a.units(batch)
        with torch.no_grad():
            for p in policy.trainable_parameters():
                p.add_(0.01)
        a.on_step(policy)
    a.on_epoch_end(policy)
    a.on_step(policy)
    state = a.state_dict()
    next_units = a.units(batch)
    late = build(seed=3, old_decay_rate=0.2)
    with pytest.raises(FlowFactoryError, match="needs setup.*first"):  # the loop calls setup, then load_state_dict
        late.load_state_dict(state)
    b = build(seed=3, old_decay_rate=0.2)
    b.setup(ToyPolicy(size=4, hidden=8), None)
    b.load_state_dict(state)
    sb = b.state_dict()
    assert {k: sb[k] for k in ("steps", "last_decay")} == {
        "steps": 4, "last_decay": pytest.approx(0.5)}  # min(3 * 0.2, 0.5)
    assert sb["ema"]["shadow"].keys() == state["ema"]["shadow"].keys()  # keyed by parameter name
    assert all(torch.equal(sb["ema"]["shadow"][k], v) for k, v in state["ema"]["shadow"].items())
    assert all(torch.equal(x.times, y.times) for x, y in zip(next_units, b.units(batch)))
