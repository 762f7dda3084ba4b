"""Online Diffusion-DPO: pairs within groups, the loss and its gradient against the formula written out here
(Wallace et al. 2023 eq. 14 with flow-matching velocity errors, computed from the toy networks directly), the
gradient at the reference, draws keyed by the pair's rows, and a micro-batch without pairs."""

from __future__ import annotations

import pydantic
import pytest
import torch
import torch.nn.functional as F

from flowfactory.registry import BuildContext
from flowfactory.testing import load_registry
from flowfactory.testing.contracts import make_generators
from flowfactory.types import TrainBatch
from flowfactory_dpo import DPOOptions
from flowfactory_dpo.loss import DPO, form_pairs

N, G = 6, 3  # two groups of three


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture
def policy(registry):
    return registry.get("policy", "toy").create({"size": 8, "hidden": 16}, BuildContext(seed=0))


@pytest.fixture
def batch(registry, policy) -> TrainBatch:
    sampler = registry.get("sampler", "ode").create({"steps": 4}, BuildContext(seed=0))
    cond = policy.encode(["a red square"] * G + ["a blue circle"] * G)
    with torch.no_grad():
        traj = sampler.rollout(policy, cond, policy.noise(make_generators(range(N))), make_generators(range(N)),
                               keep="final", deterministic=True)
    return TrainBatch(trajectory=traj, cond=cond, advantages=torch.zeros(N), fresh=True,
                      sample_keys=tuple((2, 0, 10 + i) for i in range(N)), group_ids=torch.tensor([4, 4, 4, 7, 7, 7]),
                      rewards=torch.tensor([0.2, 0.9, 0.5, 0.3, 0.3, 0.1]))


def make(**options) -> DPO:
    return DPO(DPOOptions(**options), seed=5)


@torch.no_grad()
def perturb(params, size: float = 0.05, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * size)


def grads(params):
    out = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


def hand_loss(policy, batch, unit, beta):
    """Row losses [B] from the formula: per pair, shared eps and t, e = mean (v - (eps - x0))^2 for the policy and
    the reference, -log sigmoid(-beta/2 ((e_w - e_w_ref) - (e_l - e_l_ref))); a row carries its group's mean."""
    x0 = batch.trajectory.final.float()
    text = batch.cond["text"]
    pair_losses = []
    for (w, lo), t, seed in zip(unit.pairs, unit.times.tolist(), unit.noise_seeds):
        eps = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed))
        e = {}
        for row in (w, lo):
            x_t = (1 - t) * x0[row] + t * eps
            tt = torch.tensor([t])
            v = policy.net(x_t[None], tt, text[row][None])[0]
            with torch.no_grad():
                v_ref = policy._frozen(x_t[None], tt, text[row][None])[0]
            target = eps.double() - x0[row].double()  # in float64: beta / 2 amplifies rounding in e_w - e_w_ref
            e[row] = (((v.double() - target) ** 2).mean(), ((v_ref.double() - target) ** 2).mean())
        inside = -beta / 2 * ((e[w][0] - e[w][1]) - (e[lo][0] - e[lo][1]))
        pair_losses.append(-F.logsigmoid(inside))
    groups = batch.group_ids.tolist()
    rows = []
    for i in range(len(x0)):
        mine = [pl for (w, _), pl in zip(unit.pairs, pair_losses) if groups[w] == groups[i]]
        rows.append(torch.stack(mine).mean() if mine else torch.zeros(()))
    return torch.stack(rows)


def test_pairs_within_groups(batch):
    assert form_pairs(batch, "best-worst", 0.0) == [(1, 0), (3, 5)]  # ties: the first of equal maxima
    assert form_pairs(batch, "best-worst", 0.5) == [(1, 0)]  # a gap of 0.2 is not > 0.5
    assert form_pairs(batch, "all", 0.0) == [(1, 0), (2, 0), (1, 2), (3, 5), (4, 5)]  # 0.3 vs 0.3: no pair
    assert form_pairs(batch, "all", 0.35) == [(1, 0), (1, 2)]


@pytest.mark.parametrize("pairs, beta", [("best-worst", 200.0), ("all", 50.0)])
def test_loss_and_gradient_match_the_formula(policy, batch, pairs, beta):
    opt = make(pairs=pairs, beta=beta, num_times=2, time_shift=2.0)
    assert opt.requirements.whole_groups and opt.requirements.reference and opt.requirements.keep == "final"
    params = policy.trainable_parameters()
    perturb(params)  # the policy moves away from the reference
    units = opt.units(batch)
    assert len(units) == 2 and all(u.pairs == tuple(form_pairs(batch, pairs, 0.0)) for u in units)
    for unit in units:
        expected = hand_loss(policy, batch, unit, beta)
        expected.sum().backward()
        want = grads(params)
        out = opt.loss(policy, None, batch, unit)
        out.loss.sum().backward()
        got = grads(params)
        err = (out.loss - expected).abs().max().item()
        assert err < 1e-5 * max(1.0, expected.abs().max().item()), err
        scale = max(c.abs().max().item() for c in want)
        assert scale > 0 and max((a - c).abs().max().item() for a, c in zip(got, want)) < 1e-4 * scale
        assert 0.0 < float(out.metrics["dpo/implicit_acc"]) < 1.0 or pairs == "best-worst"


def test_at_the_reference_the_gradient_is_beta_over_4_times_the_error_gap(policy, batch):
    """With theta = ref, inside = 0, L = log 2, and dL = beta/4 d(e_w - e_l): lower the winner's error, raise the
    loser's (Diffusion-DPO's gradient at initialisation)."""
    opt = make(beta=8.0, num_times=1)
    unit = opt.units(batch)[0]
    params = policy.trainable_parameters()
    out = opt.loss(policy, None, batch, unit)
    torch.testing.assert_close(out.loss, torch.full((N,), torch.log(torch.tensor(2.0)).item()))
    out.loss.sum().backward()
    got = grads(params)
    x0 = batch.trajectory.final.float()
    gap = 0.0
    for (w, lo), t, seed in zip(unit.pairs, unit.times.tolist(), unit.noise_seeds):
        eps = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed))
        sign = {w: 1.0, lo: -1.0}
        for row in (w, lo):
            x_t = (1 - t) * x0[row] + t * eps
            v = policy.net(x_t[None], torch.tensor([t]), batch.cond["text"][row][None])[0]
            gap = gap + sign[row] * ((v - (eps - x0[row])) ** 2).mean()
    (G * 8.0 / 4 * gap).backward()  # each pair's loss is carried by the G rows of its group
    for a, c in zip(got, grads(params)):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-4)


def test_draws_come_from_the_pairs_rows_keys(policy, batch):
    """A pair draws the same times and noise alone in a micro-batch or beside another group, in any order."""
    opt = make(num_times=3)
    full = opt.units(batch)
    second = opt.units(batch.select([3, 4, 5]))
    swapped = opt.units(batch.select([3, 4, 5, 0, 1, 2]))
    for k in range(3):
        assert second[k].noise_seeds[0] == full[k].noise_seeds[1] == swapped[k].noise_seeds[0]
        assert second[k].times[0] == full[k].times[1] == swapped[k].times[0]
    times = torch.stack([u.times for u in full])  # [K, P]: stratified, one time in each third per pair
    assert sorted((times[:, 0] * 3).floor().long().tolist()) == [0, 1, 2]
    # a different run seed draws differently
    assert DPO(DPOOptions(num_times=3), seed=6).units(batch)[0].noise_seeds != full[0].noise_seeds


def test_a_micro_batch_without_pairs_has_zero_loss_and_zero_gradient(policy, batch):
    equal = batch.select([3, 4])  # two rollouts of one group with equal rewards
    opt = make()
    units = opt.units(equal)
    assert all(u.pairs == () for u in units)
    out = opt.loss(policy, None, equal, units[0])
    assert out.loss.requires_grad and out.loss.tolist() == [0.0, 0.0]
    out.loss.sum().backward()
    params = policy.trainable_parameters()
    assert all(p.grad is not None and not bool(p.grad.any()) for p in params)
    assert set(out.metrics) == set(opt.loss(policy, None, batch, opt.units(batch)[0]).metrics)


def test_options_are_validated():
    with pytest.raises(pydantic.ValidationError):
        DPOOptions(pairs="random")
    with pytest.raises(pydantic.ValidationError):
        DPOOptions(time_min=0.8, time_max=0.5)
    with pytest.raises(pydantic.ValidationError):
        DPOOptions(beta=0.0)
