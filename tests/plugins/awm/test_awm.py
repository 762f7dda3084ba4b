"""AWM's loss, weightings, KL terms, time sampling and state, checked against hand computations of the
paper's formulas (Xue et al. 2025) on the toy policy."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch

from flowfactory.errors import FlowFactoryError
from flowfactory.registry import BuildContext
from flowfactory.testing import load_registry
from flowfactory.testing.contracts import make_generators
from flowfactory.types import TrainBatch
from flowfactory_awm import AWMOptions
from flowfactory_awm.loss import AWM, AWMUnit, sample_times, weighted_log_likelihood

N = 4


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture
def policy(registry):
    return registry.get("policy", "toy").create({"size": 8, "hidden": 16}, BuildContext(seed=0))


@pytest.fixture
def batch(registry, policy) -> TrainBatch:
    sampler = registry.get("sampler", "ode").create({"steps": 4}, BuildContext(seed=0))
    prompts = ["a red square", "a red square", "a blue circle", "a blue circle"]
    cond = policy.encode(prompts)
    with torch.no_grad():
        traj = sampler.rollout(policy, cond, policy.noise(make_generators(range(N))), make_generators(range(N)),
                               keep="final", deterministic=True)
    return TrainBatch(trajectory=traj, cond=cond, advantages=torch.tensor([1.5, -0.5, 7.0, -2.0]), fresh=True,
                      sample_keys=tuple((1, 0, i) for i in range(N)))


def make(policy, **options) -> AWM:
    opt = AWM(AWMOptions(**options), seed=3)
    opt.setup(policy, None)
    return opt


def unit(times: list[float], seed: int = 11) -> AWMUnit:
    return AWMUnit(index=0, times=torch.tensor(times), noise_seeds=tuple(seed + i for i in range(len(times))))


def eps_for(u: AWMUnit, x0: torch.Tensor) -> torch.Tensor:
    """Row i from its own seed."""
    return torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(s)) for s in u.noise_seeds])


def fm_error(policy, batch: TrainBatch, u: AWMUnit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, eps, per-sample mean squared error of v against eps - x0), written from the paper."""
    x0 = batch.trajectory.final.float()
    eps = eps_for(u, x0)
    t = u.times.view(-1, 1, 1, 1)
    x_t = (1 - t) * x0 + t * eps
    v = policy.velocity(x_t, u.times, batch.cond)
    return x_t, eps, ((v - (eps - x0)) ** 2).flatten(1).mean(1)


@torch.no_grad()
def perturb(params, size: float = 0.05, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * size)


# --- weightings ----------------------------------------------------------------------------------------------

def test_weighting_values_at_known_t():
    e = torch.tensor([0.04, 0.04], dtype=torch.float64)
    t = torch.tensor([0.5, 1.0], dtype=torch.float64)
    exp = {
        "uniform": [-0.04, -0.04],
        "t": [-0.02, -0.04],
        "t^2": [-0.01, -0.04],
        "huber": [-(math.sqrt(0.04 + 1e-10) - 1e-5) * 0.5, -(math.sqrt(0.04 + 1e-10) - 1e-5)],
        "ghuber": [-((0.04 + 1e-10) ** 0.25 - 1e-10**0.25) * 0.5 / 0.25, -((0.04 + 1e-10) ** 0.25 - 1e-10**0.25) / 0.25],
    }
    for w, values in exp.items():
        got = weighted_log_likelihood(e, t, w, 1e-10, 0.25)
        assert torch.allclose(got, torch.tensor(values, dtype=torch.float64), rtol=1e-12, atol=1e-15), w
    # huber's delta and the generalised power are options: sqrt(e + d) - sqrt(d), ((e + d)^p - d^p) / p
    assert float(weighted_log_likelihood(e, t, "huber", 0.01)[1]) == pytest.approx(-(math.sqrt(0.05) - 0.1))
    assert float(weighted_log_likelihood(e, t, "ghuber", 1e-10, 0.5)[0]) == pytest.approx(
        -((0.04 + 1e-10) ** 0.5 - 1e-5) * 0.5 / 0.5)
    assert float(weighted_log_likelihood(torch.zeros(1, dtype=torch.float64), t[:1], "ghuber")[0]) == 0.0


def test_weighting_and_option_errors():
    with pytest.raises(ValueError, match="weighting"):
        weighted_log_likelihood(torch.ones(1), torch.ones(1), "cubic")
    with pytest.raises(pydantic.ValidationError):
        AWMOptions(weighting="cubic")
    with pytest.raises(pydantic.ValidationError):
        AWMOptions(time_min=0.6, time_max=0.5)
    with pytest.raises(pydantic.ValidationError):
        AWMOptions(unknown=1)


# --- the loss --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weighting", ["uniform", "t", "t^2", "huber", "ghuber"])
def test_loss_matches_the_paper_formula(policy, batch, weighting):
    """Non-fresh batch: ratio from the rollout snapshot, clipped objective, t near 0 and 1, float32."""
    opt = make(policy, weighting=weighting, clip_range=0.05, adv_clip=5.0)
    u = unit([0.001, 0.3, 0.7, 0.999])
    opt.on_rollout(policy)
    with torch.no_grad():
        _, _, e_old = fm_error(policy, batch, u)
    params = policy.trainable_parameters()
    perturb(params)
    with torch.no_grad():
        _, _, e_new = fm_error(policy, batch, u)
        b = TrainBatch(batch.trajectory, batch.cond, batch.advantages, fresh=False)
        got = opt.loss(policy, None, b, u)
    t = u.times

    def logp(e: torch.Tensor) -> torch.Tensor:
        w = {"uniform": e, "t": t * e, "t^2": t * t * e, "huber": t * (torch.sqrt(e + 1e-10) - 1e-5),
             "ghuber": t * ((e + 1e-10) ** 0.25 - 1e-10**0.25) / 0.25}[weighting]
        return -w

    ratio = torch.exp(logp(e_new) - logp(e_old))
    adv = batch.advantages.clamp(-5, 5)
    expected = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.95, 1.05))
    assert got.loss.dtype == torch.float32 and got.loss.shape == (N,)
    assert torch.allclose(got.loss, expected, rtol=1e-4, atol=1e-6), (got.loss, expected)
    assert (ratio - 1).abs().max() > 1e-4  # the perturbation moved the policy: the test sees the ratio
    assert float(got.metrics["awm/ratio"]) == pytest.approx(float(ratio.mean()), rel=1e-4)


def test_advantage_rescaling(policy, batch):
    opt = make(policy, adv_clip=2.0, advantage_max=1.0)
    u = unit([0.2, 0.4, 0.6, 0.8])
    with torch.no_grad():
        got = opt.loss(policy, None, batch, u).loss
    assert torch.allclose(got, -batch.advantages.clamp(-2, 2) / 2.0, atol=1e-7)  # ratio == 1 when fresh


def test_fresh_ratio_is_one_and_gradient_is_advantage_weighted_matching(policy, batch):
    opt = make(policy, weighting="t", clip_range=1e-4)
    u = unit([0.05, 0.5, 0.5, 0.95])
    params = policy.trainable_parameters()
    out = opt.loss(policy, None, batch, u)
    assert float(out.metrics["awm/ratio"]) == 1.0 and float(out.metrics["awm/clipfrac"]) == 0.0
    grads = torch.autograd.grad(out.loss.sum(), params)
    _, _, e = fm_error(policy, batch, u)
    adv = batch.advantages.clamp(-5, 5)
    expected = torch.autograd.grad((adv * u.times * e).sum(), params)  # -A * log p, log p = -t e
    for g, h in zip(grads, expected):
        assert torch.allclose(g, h, rtol=1e-4, atol=1e-7)


# --- KL terms --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["uniform", "elbo"])
def test_kl_to_reference(policy, batch, kind):
    u = unit([0.1, 0.4, 0.8, 0.995])
    perturb(policy.trainable_parameters())  # so the policy differs from the reference
    with torch.no_grad():
        base = make(policy).loss(policy, None, batch, u).loss
        out = make(policy, kl_beta=0.5, kl_weight=kind).loss(policy, None, batch, u)
        x_t, _, _ = fm_error(policy, batch, u)
        v = policy.velocity(x_t, u.times, batch.cond)
        with policy.reference():
            v_ref = policy.velocity(x_t, u.times, batch.cond)
    kl = ((v - v_ref) ** 2).flatten(1).mean(1)
    if kind == "elbo":
        std = 0.7 * torch.sqrt(u.times / (1 - u.times.clamp(max=0.99)))
        kl = kl / (2 * std**2)
    assert kl.min() > 0
    assert torch.allclose(out.loss - base, 0.5 * kl, rtol=1e-4, atol=1e-7)
    assert float(out.metrics["awm/kl"]) == pytest.approx(float(kl.mean()), rel=1e-4)


def test_kl_to_ema_policy(policy, batch):
    params = policy.trainable_parameters()
    opt = make(policy, ema_kl_beta=2.0, ema_decay=0.3, ema_decay_schedule="constant", ema_update="step")
    start = [p.detach().clone() for p in params]
    perturb(params)
    opt.on_step(policy)  # EMA = 0.3 start + 0.7 current
    ema = [0.3 * s + 0.7 * p.detach() for s, p in zip(start, params)]
    for s, e in zip(opt.ema.shadow.values(), ema):
        assert torch.allclose(s, e, atol=1e-7)
    perturb(params, seed=1)
    u = unit([0.3, 0.5, 0.6, 0.9])
    with torch.no_grad():
        base = make(policy).loss(policy, None, batch, u).loss
        out = opt.loss(policy, None, batch, u)
        x_t, _, _ = fm_error(policy, batch, u)
        v = policy.velocity(x_t, u.times, batch.cond)
        current = [p.detach().clone() for p in params]
        for p, e in zip(params, ema):
            p.copy_(e)
        v_ema = policy.velocity(x_t, u.times, batch.cond)
        for p, c in zip(params, current):
            p.copy_(c)
    kl = ((v - v_ema) ** 2).flatten(1).mean(1)
    assert torch.allclose(out.loss - base, 2.0 * kl, rtol=1e-4, atol=1e-7)
    assert all(torch.equal(p, c) for p, c in zip(params, current))  # the swap restored the trained weights


def test_ema_linear_decay_per_epoch(policy):
    params = policy.trainable_parameters()
    opt = make(policy, ema_kl_beta=1.0, ema_decay=0.3)  # linear schedule, per-epoch update (the reference)
    start = [p.detach().clone() for p in params]
    for _ in range(3):
        perturb(params)
        opt.on_step(policy)
    assert all(torch.equal(s, p) for s, p in zip(opt.ema.shadow.values(), start))  # not yet: once per epoch
    with opt.sampling(policy):
        pass
    assert all(torch.equal(s, p) for s, p in zip(opt.ema.shadow.values(), start))  # sampling does not move it
    opt.on_epoch_end(policy)
    d = min(0.3, 0.001 * 3)
    for s, s0, p in zip(opt.ema.shadow.values(), start, params):
        assert torch.allclose(s, d * s0 + (1 - d) * p.detach(), atol=1e-7)
    assert opt.ema.decay == pytest.approx(d)


# --- time sampling, randomness, state --------------------------------------------------------------------------

def test_time_samplers():
    g = torch.Generator().manual_seed(0)
    t = sample_times("uniform", 4, 64, g, shift=1.0, lo=0.2, hi=1.0)
    strata = ((t - 0.2) / 0.8 * 4).floor().long().clamp(max=3)
    assert all(sorted(col.tolist()) == [0, 1, 2, 3] for col in strata.T)  # one per stratum, per sample
    shifted = sample_times("uniform", 4, 64, torch.Generator().manual_seed(0), shift=3.0)
    assert torch.allclose(shifted, 3 * t / (1 + 2 * t))
    ln = sample_times("logit_normal", 5, 3, g, shift=3.0)
    assert (ln == ln[:, :1]).all() and (ln >= 0.01).all() and (ln < 1).all()  # shared by the micro-batch
    sig = torch.linspace(1, 0, 11)
    d = sample_times("discrete", 3, 2, g, sigmas=sig, fraction=0.9)
    idx = [int(round(float(1 - x) * 10)) for x in d[:, 0]]
    assert 1 <= idx[0] < 3 <= idx[1] < 6 <= idx[2] < 9  # linspace(1, 9, 4) strata, never index 0


def test_times_and_noise_are_drawn_from_the_rows_keys(policy, batch):
    before = torch.get_rng_state()
    a = make(policy, time_type="uniform", num_times=3)
    first = a.units(batch)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    b = make(policy, time_type="uniform", num_times=3)
    again = b.units(batch)  # another instance, same keys: the same draws (no hidden counter)
    assert all(torch.equal(x.times, y.times) and x.noise_seeds == y.noise_seeds for x, y in zip(first, again))
    with torch.no_grad():
        la = a.loss(policy, None, batch, first[1]).loss
        lb = b.loss(policy, None, batch, again[1]).loss
    assert torch.equal(la, lb)
    # uniform times and all noise are per rollout: rows 1..3 alone draw what they draw in the whole batch
    part = batch.select(slice(1, N))
    for whole, alone in zip(first, a.units(part)):
        assert torch.equal(alone.times, whole.times[1:]) and alone.noise_seeds == whole.noise_seeds[1:]
    with torch.no_grad():
        torch.testing.assert_close(a.loss(policy, None, part, a.units(part)[1]).loss, la[1:], atol=1e-6, rtol=0)
    # the next epoch's keys draw anew
    later = batch.select(slice(None))
    later.sample_keys = tuple((2, 0, i) for i in range(N))
    assert not torch.equal(a.units(later)[0].times, first[0].times)
    # discrete times are shared by the micro-batch, drawn from its first row's key
    d = make(policy, num_times=2).units(batch)
    assert all(bool((u.times == u.times[0]).all()) for u in d)


def test_state_dict_round_trip(policy, batch):
    params = policy.trainable_parameters()
    a = make(policy, ema_kl_beta=1.0, ema_update="step")
    for _ in range(2):
        a.units(batch)
        perturb(params)
        a.on_step(policy)
    state = a.state_dict()
    assert (state["steps"], state["ema_steps"]) == (2, 2)
    late = AWM(AWMOptions(ema_kl_beta=1.0, ema_update="step"), seed=3)
    with pytest.raises(FlowFactoryError, match="needs setup.*first"):  # the loop calls setup, then load_state_dict
        late.load_state_dict(state)
    other = make(policy, ema_kl_beta=1.0, ema_update="step")
    other.load_state_dict(state)
    assert other.state_dict()["ema_steps"] == 2 and other.steps == 2
    assert other.ema.shadow.keys() == a.ema.shadow.keys()  # keyed by parameter name
    assert all(torch.equal(other.ema.shadow[k], v) for k, v in a.ema.shadow.items())
    assert torch.equal(other.units(batch)[0].times, a.units(batch)[0].times)
