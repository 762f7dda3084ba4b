"""The built-in samplers' step math, checked against the formulas recomputed here in float64.

Flow-GRPO SDE step, dt = sigma_next - sigma < 0:
    std_t  = a * sqrt(sigma / (1 - sigma))        (at sigma = 1 the denominator uses the schedule's sigmas[1])
    mean   = x (1 + std_t^2 / (2 sigma) dt) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt
    x_next = mean + std_t sqrt(-dt) eps
    log p  = mean over latent dims of the Gaussian log density of x_next
DanceGRPO SDE step (its FLUX script's flux_step with sde_solver=True):
    x0_hat = x - sigma v,  score = -(x - (1 - sigma) x0_hat) / sigma^2
    mean   = x + dt v + (-eta^2 / 2 * score) dt,   std = eta sqrt(-dt)
CPS step (Flow-GRPO's sde_type="cps"):
    std    = sigma_next sin(a pi / 2),  x0_hat = x - sigma v,  eps_hat = x + (1 - sigma) v
    mean   = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) eps_hat
Every SDE sampler's log p is the Gaussian density of x_next averaged over latent dims.
Euler ODE step: x_next = x + dt v.

The velocity is a fixed analytic function (AnalyticPolicy), so the reference needs no network.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from flowfactory.registry import BuildContext, Registry
from flowfactory.samplers.flow import gaussian_log_prob
from flowfactory.seeding import randn_per_sample
from flowfactory.testing import load_registry, make_generators
from flowfactory.testing.toy import ToyPolicy
from flowfactory.types import Conditioning, Trajectory

LATENT = (2, 3, 4)


class AnalyticPolicy:
    """v(x, sigma, c) = w * x + b * sigma + c, elementwise, with c a per-sample conditioning offset.

    The schedule is the shifted one t -> shift t / (1 + (shift - 1) t) on a uniform t grid, so steps are
    unequal and the first sigma is exactly 1."""

    latent_shape = LATENT
    fsdp_block_classes: tuple[type, ...] = ()

    def __init__(self, w: float = -0.7, b: float = 0.4, shift: float = 3.0):
        self.module = nn.Module()
        self.module.w = nn.Parameter(torch.tensor(w))
        self.b = b
        self.shift = shift

    def encode(self, prompts: list[str]) -> Conditioning:
        return {"c": torch.tensor([0.1 * len(p) for p in prompts], dtype=torch.float32)}

    def noise(self, generators: list[torch.Generator]) -> torch.Tensor:
        return randn_per_sample(self.latent_shape, generators)

    def sigmas(self, steps: int) -> torch.Tensor:
        t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        return (self.shift * t / (1 + (self.shift - 1) * t)).float()

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.ndim - 1)
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]).reshape(shape)
        return self.module.w * x + self.b * sigma + cond["c"].to(x.dtype).reshape(shape)


def ref_velocity(policy: AnalyticPolicy, x: torch.Tensor, sigma: float, c: torch.Tensor) -> torch.Tensor:
    """The analytic velocity in float64."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    return float(policy.module.w.detach()) * x.double() + policy.b * sigma + c.double().reshape(shape)


def ref_sde_step(x: torch.Tensor, v: torch.Tensor, sigmas: list[float], i: int,
                 a: float) -> tuple[torch.Tensor, float]:
    """Flow-GRPO's step mean and std, in float64, from the formulas."""
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    dt = sigma_next - sigma
    denominator_sigma = sigmas[1] if sigma == 1.0 else sigma
    std_t = a * math.sqrt(sigma / (1 - denominator_sigma))
    mean = x.double() * (1 + std_t**2 / (2 * sigma) * dt) + v.double() * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_t * math.sqrt(-dt)


def ref_dance_step(x: torch.Tensor, v: torch.Tensor, sigmas: list[float], i: int,
                   eta: float) -> tuple[torch.Tensor, float]:
    """DanceGRPO's step mean and std, in float64, from the formulas."""
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    dsigma = sigma_next - sigma
    x, v = x.double(), v.double()
    x0_hat = x - sigma * v
    score = -(x - (1 - sigma) * x0_hat) / sigma**2
    mean = x + dsigma * v + (-0.5 * eta**2 * score) * dsigma
    return mean, eta * math.sqrt(sigma - sigma_next)


def ref_cps_step(x: torch.Tensor, v: torch.Tensor, sigmas: list[float], i: int,
                 a: float) -> tuple[torch.Tensor, float]:
    """The coefficients-preserving step's mean and std, in float64, from the formulas."""
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    x, v = x.double(), v.double()
    std = sigma_next * math.sin(a * math.pi / 2)
    x0_hat = x - sigma * v
    eps_hat = x + (1 - sigma) * v
    mean = (1 - sigma_next) * x0_hat + math.sqrt(sigma_next**2 - std**2) * eps_hat
    return mean, std


RefStep = Callable[[torch.Tensor, torch.Tensor, list[float], int], tuple[torch.Tensor, float]]


def ref_step(name: str, sampler: Any) -> RefStep:
    """The float64 reference of sampler `name`'s stochastic step, with the sampler's noise parameter."""
    if name == "flow-sde":
        return lambda x, v, sig, i: ref_sde_step(x, v, sig, i, sampler.noise_level)
    if name == "dance-sde":
        return lambda x, v, sig, i: ref_dance_step(x, v, sig, i, sampler.eta)
    assert name == "cps"
    return lambda x, v, sig, i: ref_cps_step(x, v, sig, i, sampler.noise_level)


def ref_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """Gaussian log density in float64, averaged over every dim but the batch."""
    z = (x_next.double() - mean.double()) / std
    lp = -0.5 * z**2 - math.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


@pytest.fixture(scope="module")
def registry() -> Registry:
    """Built-ins and the toy policy only: core's tests do not depend on installed plugin packages."""
    return load_registry(entry_points=False)


def build(registry: Registry, name: str, seed: int = 0, **options: Any) -> Any:
    return registry.get("sampler", name).create(options, BuildContext(seed=seed))


PROMPTS = ["a red square", "a blue circle", "a green triangle!"]


def rollout(sampler: Any, policy: Any, rows: list[int], **kwargs: Any) -> Trajectory:
    """Sample `rows` of PROMPTS with noise seeds 10+row and step seeds 50+row."""
    cond = policy.encode([PROMPTS[r] for r in rows])
    noise = policy.noise(make_generators([10 + r for r in rows]))
    return sampler.rollout(policy, cond, noise, make_generators([50 + r for r in rows]), **kwargs)


# --- one step against the formulas ------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [2, 5, 10])
@pytest.mark.parametrize("noise_level", [0.3, 0.7, 1.2])
def test_sde_step_distribution_matches_formula_at_every_step(registry: Registry, steps: int,
                                                             noise_level: float) -> None:
    policy = AnalyticPolicy()
    sampler = build(registry, "flow-sde", steps=steps, noise_level=noise_level)
    sigmas = policy.sigmas(steps)
    sig = [float(s) for s in sigmas]
    x = torch.randn(3, *LATENT, generator=torch.Generator().manual_seed(steps))
    cond = policy.encode(PROMPTS)
    for i in range(steps):  # the first step (sigma = 1) and the last (sigma_next = 0) included
        with torch.no_grad():
            d = sampler.step_distribution(policy, x, sigmas, i, cond, stochastic=True)
        mean, std = ref_sde_step(x, ref_velocity(policy, x, sig[i], cond["c"]), sig, i, noise_level)
        assert d.mean.dtype == torch.float32
        torch.testing.assert_close(d.mean.double(), mean, rtol=1e-5, atol=1e-6)
        assert float(d.std) == pytest.approx(std, rel=1e-6)


def test_first_sde_step_uses_the_second_sigma_so_its_std_is_the_noise_level(registry: Registry) -> None:
    """At sigma = 1, std_t = a sqrt(1 / (1 - sigmas[1])) and the step std is std_t sqrt(1 - sigmas[1]) = a."""
    policy = AnalyticPolicy(shift=2.0)
    for a in (0.5, 0.9):
        sampler = build(registry, "flow-sde", steps=6, noise_level=a)
        sigmas = policy.sigmas(6)
        assert float(sigmas[0]) == 1.0
        x = torch.zeros(1, *LATENT)
        with torch.no_grad():
            d = sampler.step_distribution(policy, x, sigmas, 0, policy.encode(["p"]), stochastic=True)
        assert float(d.std) == pytest.approx(a, rel=1e-6)
        assert math.isfinite(float(d.mean.abs().max()))


@pytest.mark.parametrize("steps", [2, 5, 10])
@pytest.mark.parametrize("name,level_option,levels", [("dance-sde", "eta", [0.1, 0.3, 1.0]),
                                                      ("cps", "noise_level", [0.2, 0.7, 1.0])])
def test_dance_and_cps_steps_match_formula_at_every_step(registry: Registry, steps: int, name: str,
                                                         level_option: str, levels: list[float]) -> None:
    """Mean, std and log-prob of every step, the first (sigma = 1) and the last (sigma_next = 0) included."""
    policy = AnalyticPolicy()
    sigmas = policy.sigmas(steps)
    sig = [float(s) for s in sigmas]
    assert sig[0] == 1.0 and sig[-1] == 0.0
    gen = torch.Generator().manual_seed(steps)
    x = torch.randn(3, *LATENT, generator=gen)
    cond = policy.encode(PROMPTS)
    for level in levels:
        sampler = build(registry, name, steps=steps, **{level_option: level})
        step = ref_step(name, sampler)
        for i in range(steps):
            with torch.no_grad():
                d = sampler.step_distribution(policy, x, sigmas, i, cond, stochastic=True)
            mean, std = step(x, ref_velocity(policy, x, sig[i], cond["c"]), sig, i)
            assert d.mean.dtype == torch.float32 and d.mean.shape == x.shape
            torch.testing.assert_close(d.mean.double(), mean, rtol=1e-5, atol=1e-5)
            assert float(d.std) == pytest.approx(std, rel=1e-6, abs=1e-12)
            if std > 0:
                x_next = mean + std * torch.randn(3, *LATENT, generator=gen, dtype=torch.float64)
                lp = gaussian_log_prob(x_next.float(), d.mean, d.std)
                torch.testing.assert_close(lp.double(), ref_log_prob(x_next.float(), mean, std), rtol=1e-5, atol=1e-4)


def test_dance_step_is_flow_grpos_with_constant_std_t(registry: Registry) -> None:
    """DanceGRPO's step is Flow-GRPO's with std_t = eta at every sigma: -score = (x + (1 - sigma) v) / sigma."""
    policy = AnalyticPolicy()
    sigmas = policy.sigmas(5)
    sig = [float(s) for s in sigmas]
    x = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(4))
    cond = policy.encode(PROMPTS[:2])
    sampler = build(registry, "dance-sde", steps=5, eta=0.45)
    for i in range(5):
        with torch.no_grad():
            d = sampler.step_distribution(policy, x, sigmas, i, cond, stochastic=True)
        v = ref_velocity(policy, x, sig[i], cond["c"])
        dt = sig[i + 1] - sig[i]
        flow_grpo_form = x.double() * (1 + 0.45**2 / (2 * sig[i]) * dt) + v * (1 + 0.45**2 * (1 - sig[i]) / (2 * sig[i])) * dt
        torch.testing.assert_close(d.mean.double(), flow_grpo_form, rtol=1e-5, atol=1e-5)
        assert float(d.std) == pytest.approx(0.45 * math.sqrt(sig[i] - sig[i + 1]), rel=1e-6)


def test_cps_last_step_has_std_zero_and_is_euler(registry: Registry) -> None:
    policy = AnalyticPolicy()
    sigmas = policy.sigmas(4)
    x = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(2))
    cond = policy.encode(PROMPTS[:2])
    for a in (0.3, 1.0):
        sampler = build(registry, "cps", steps=4, noise_level=a)
        with torch.no_grad():
            d = sampler.step_distribution(policy, x, sigmas, 3, cond, stochastic=True)
        assert float(d.std) == 0.0
        euler = x.double() + (0.0 - float(sigmas[3])) * ref_velocity(policy, x, float(sigmas[3]), cond["c"])
        torch.testing.assert_close(d.mean.double(), euler, rtol=1e-5, atol=1e-5)
        assert not bool(sampler.stochastic_mask(0)[-1])


class OraclePolicy(AnalyticPolicy):
    """v = eps - x0 exactly, for x on the straight path between a fixed x0 and eps."""

    def __init__(self, x0: torch.Tensor, eps: torch.Tensor):
        super().__init__()
        self.x0, self.eps = x0, eps

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return (self.eps - self.x0).to(x.dtype)


@pytest.mark.parametrize("a", [0.25, 0.7, 1.0])
def test_cps_preserves_the_coefficients_of_the_next_sigma(registry: Registry, a: float) -> None:
    """With the exact velocity, x_next = (1 - s') x0 + s' cos(a pi/2) eps + s' sin(a pi/2) z: the data keeps
    coefficient 1 - s' and the total noise variance is s'^2, as at sigma = s' on the path."""
    gen = torch.Generator().manual_seed(9)
    x0, eps = torch.randn(2, *LATENT, generator=gen), torch.randn(2, *LATENT, generator=gen)
    policy = OraclePolicy(x0, eps)
    sigmas = policy.sigmas(6)
    sampler = build(registry, "cps", steps=6, noise_level=a)
    for i in range(5):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x = (1 - s) * x0 + s * eps
        with torch.no_grad():
            d = sampler.step_distribution(policy, x, sigmas, i, {"c": torch.zeros(2)}, stochastic=True)
        expected = (1 - s_next) * x0.double() + s_next * math.cos(a * math.pi / 2) * eps.double()
        torch.testing.assert_close(d.mean.double(), expected, rtol=1e-5, atol=1e-5)
        assert (s_next * math.cos(a * math.pi / 2)) ** 2 + float(d.std) ** 2 == pytest.approx(s_next**2, rel=1e-6)


def test_deterministic_steps_are_euler(registry: Registry) -> None:
    policy = AnalyticPolicy()
    x = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(1))
    cond = policy.encode(PROMPTS[:2])
    for name in ("ode", "flow-sde", "dance-sde", "cps"):
        sampler = build(registry, name, steps=4)
        sigmas = policy.sigmas(4)
        for i in range(4):
            with torch.no_grad():
                d = sampler.step_distribution(policy, x, sigmas, i, cond, stochastic=False)
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            expected = x.double() + (sigma_next - sigma) * ref_velocity(policy, x, sigma, cond["c"])
            torch.testing.assert_close(d.mean.double(), expected, rtol=1e-6, atol=1e-6)
            assert float(d.std) == 0.0


def test_gaussian_log_prob_is_the_density_averaged_over_dims() -> None:
    gen = torch.Generator().manual_seed(3)
    mean = torch.randn(4, 2, 5, 5, generator=gen)
    x = mean + 0.3 * torch.randn(4, 2, 5, 5, generator=gen)
    lp = gaussian_log_prob(x, mean, torch.tensor(0.3))
    assert lp.dtype == torch.float32 and tuple(lp.shape) == (4,)
    torch.testing.assert_close(lp.double(), ref_log_prob(x, mean, 0.3), rtol=1e-6, atol=1e-6)
    # At the mean the density is the Gaussian's peak, whatever the number of dims.
    peak = gaussian_log_prob(mean, mean, torch.tensor(2.0))
    torch.testing.assert_close(peak, torch.full((4,), -math.log(2.0) - 0.5 * math.log(2 * math.pi)))


# --- whole rollouts against a float64 re-integration -------------------------------------------------------

def reintegrate(policy: AnalyticPolicy, mask: torch.Tensor, steps: int, step: RefStep | None,
                rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rollout recomputed in float64 from the formulas (`step` at stochastic steps, Euler elsewhere):
    noise and step noise drawn per sample from generators seeded as `rollout` seeds them, one draw per
    stochastic step. Returns (latents, log_probs)."""
    sig = [float(s) for s in policy.sigmas(steps)]
    c = policy.encode([PROMPTS[r] for r in rows])["c"]
    x = torch.stack([torch.randn(LATENT, generator=torch.Generator().manual_seed(10 + r)) for r in rows]).double()
    step_gens = [torch.Generator().manual_seed(50 + r) for r in rows]
    states, log_probs = [x], torch.zeros(len(rows), steps, dtype=torch.float64)
    for i in range(steps):
        v = ref_velocity(policy, x, sig[i], c)
        if mask[i]:
            assert step is not None
            mean, std = step(x, v, sig, i)
            eps = torch.stack([torch.randn(LATENT, generator=g) for g in step_gens]).double()
            x = mean + std * eps
            log_probs[:, i] = ref_log_prob(x, mean, std)
        else:
            x = x + (sig[i + 1] - sig[i]) * v
        states.append(x)
    return torch.stack(states, dim=1), log_probs


ROLLOUT_CASES = [
    ("flow-sde", {"steps": 6}),
    ("flow-sde", {"steps": 6, "deterministic_last_step": False, "noise_level": 0.5}),
    ("flow-sde", {"steps": 8, "sde_window_size": 3}),
    ("flow-sde", {"steps": 8, "sde_window_size": 2, "sde_window_range": (2, 6)}),
    ("dance-sde", {"steps": 6}),
    ("dance-sde", {"steps": 6, "deterministic_last_step": False, "eta": 0.7}),
    ("dance-sde", {"steps": 8, "sde_window_size": 3}),
    ("cps", {"steps": 6}),
    ("cps", {"steps": 6, "noise_level": 1.0}),
    ("cps", {"steps": 8, "sde_window_size": 2, "sde_window_range": (2, 6), "noise_level": 0.4}),
]


@pytest.mark.parametrize("name,options", ROLLOUT_CASES)
def test_sde_rollout_equals_float64_reintegration(registry: Registry, name: str, options: dict[str, Any]) -> None:
    policy = AnalyticPolicy()
    sampler = build(registry, name, **options)
    step = ref_step(name, sampler)
    rows = [0, 1, 2]
    for epoch in (0, 1):
        t = rollout(sampler, policy, rows, epoch=epoch)
        assert torch.equal(t.stochastic, sampler.stochastic_mask(epoch))
        latents, log_probs = reintegrate(policy, t.stochastic, sampler.steps, step, rows)
        assert t.latents.dtype == torch.float32
        torch.testing.assert_close(t.latents.double(), latents, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t.log_probs.double(), log_probs, rtol=1e-4, atol=1e-4)
        # The stored log-probs are exactly the formula applied to the stored float32 states.
        sig = [float(s) for s in t.sigmas]
        c = policy.encode(PROMPTS)["c"]
        for i in range(sampler.steps):
            x = t.latents[:, i]
            if t.stochastic[i]:
                mean, std = step(x, ref_velocity(policy, x, sig[i], c), sig, i)
                torch.testing.assert_close(t.log_probs[:, i].double(), ref_log_prob(t.latents[:, i + 1], mean, std),
                                           rtol=1e-5, atol=1e-5)
            else:
                assert bool((t.log_probs[:, i] == 0).all())


def test_sde_last_step_is_euler_by_default(registry: Registry) -> None:
    policy = AnalyticPolicy()
    sampler = build(registry, "flow-sde", steps=5)
    t = rollout(sampler, policy, [0, 1])
    assert not bool(t.stochastic[-1]) and bool(t.stochastic[:-1].all())
    x, sig = t.latents[:, -2], [float(s) for s in t.sigmas]
    expected = x.double() + (0.0 - sig[-2]) * ref_velocity(policy, x, sig[-2], policy.encode(PROMPTS[:2])["c"])
    torch.testing.assert_close(t.final.double(), expected, rtol=1e-6, atol=1e-6)


def test_ode_rollout_equals_float64_euler(registry: Registry) -> None:
    policy = AnalyticPolicy()
    sampler = build(registry, "ode", steps=7)
    t = rollout(sampler, policy, [0, 1, 2])
    assert not bool(t.stochastic.any()) and bool((t.log_probs == 0).all())
    latents, _ = reintegrate(policy, t.stochastic, 7, None, [0, 1, 2])
    torch.testing.assert_close(t.latents.double(), latents, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["flow-sde", "dance-sde", "cps"])
def test_log_prob_recomputes_the_rollout_with_grad(registry: Registry, name: str) -> None:
    policy = AnalyticPolicy()
    sampler = build(registry, name, steps=6)
    t = rollout(sampler, policy, [0, 1, 2])
    cond = policy.encode(PROMPTS)
    for i in t.stochastic_steps():
        d = sampler.log_prob(policy, t, i, cond)
        assert float((d.log_prob.detach() - t.log_probs[:, i]).abs().max()) < 1e-5
        policy.module.w.grad = None
        d.log_prob.sum().backward()
        assert policy.module.w.grad is not None and float(policy.module.w.grad) != 0.0


# --- SDE windows --------------------------------------------------------------------------------------------

def window(mask: torch.Tensor) -> list[int]:
    return [int(i) for i in mask.nonzero().flatten()]


@pytest.mark.parametrize("steps,size", [(10, 1), (10, 3), (8, 4), (6, 5)])
def test_window_is_contiguous_of_its_size_in_the_default_range(registry: Registry, steps: int, size: int) -> None:
    sampler = build(registry, "flow-sde", steps=steps, sde_window_size=size)
    last = steps - 1  # the last step stays deterministic
    hi = min(steps // 2, last - size + 1)
    starts = set()
    for epoch in range(40):
        idx = window(sampler.stochastic_mask(epoch))
        assert len(idx) == size and idx == list(range(idx[0], idx[0] + size))
        assert 0 <= idx[0] < max(1, hi)
        assert idx[-1] < last
        starts.add(idx[0])
    assert starts == set(range(max(1, hi))), "over 40 epochs the window should start everywhere it may"


def test_window_range_bounds_the_start_and_varies_per_epoch(registry: Registry) -> None:
    sampler = build(registry, "flow-sde", steps=10, sde_window_size=2, sde_window_range=(3, 7))
    starts = [window(sampler.stochastic_mask(e))[0] for e in range(60)]
    assert set(starts) == {3, 4, 5, 6}


def test_window_may_reach_the_last_step_when_it_is_stochastic(registry: Registry) -> None:
    sampler = build(registry, "flow-sde", steps=4, sde_window_size=4, deterministic_last_step=False)
    assert bool(sampler.stochastic_mask(0).all())
    sampler = build(registry, "flow-sde", steps=6, sde_window_size=2, sde_window_range=(4, 5),
                    deterministic_last_step=False)
    assert window(sampler.stochastic_mask(3)) == [4, 5]


def test_without_window_every_step_but_the_last_is_stochastic(registry: Registry) -> None:
    assert window(build(registry, "flow-sde", steps=5).stochastic_mask(0)) == [0, 1, 2, 3]
    assert window(build(registry, "flow-sde", steps=5, deterministic_last_step=False).stochastic_mask(9)) == [
        0, 1, 2, 3, 4]


def test_window_is_determined_by_seed_and_epoch(registry: Registry) -> None:
    def starts(seed: int) -> list[int]:
        sampler = build(registry, "flow-sde", seed=seed, steps=12, sde_window_size=2)
        return [window(sampler.stochastic_mask(e))[0] for e in range(30)]

    assert starts(0) == starts(0)
    assert starts(0) != starts(1)
    sampler = build(registry, "flow-sde", steps=12, sde_window_size=2)
    assert torch.equal(sampler.stochastic_mask(5), sampler.stochastic_mask(5))


@pytest.mark.parametrize("name", ["dance-sde", "cps"])
@pytest.mark.parametrize("options", [{"steps": 7}, {"steps": 10, "sde_window_size": 3},
                                     {"steps": 10, "sde_window_size": 2, "sde_window_range": (3, 7)}])
def test_every_sde_sampler_shares_flow_sde_window(registry: Registry, name: str, options: dict[str, Any]) -> None:
    """One window implementation: same options and seed, same stochastic steps in every epoch."""
    ref = build(registry, "flow-sde", seed=4, **options)
    sampler = build(registry, name, seed=4, **options)
    for epoch in range(12):
        assert torch.equal(sampler.stochastic_mask(epoch), ref.stochastic_mask(epoch))


def test_deterministic_rollout_ignores_the_window_and_the_generators(registry: Registry) -> None:
    policy = AnalyticPolicy()
    sde = build(registry, "flow-sde", steps=6, sde_window_size=2)
    ode = build(registry, "ode", steps=6)
    t = rollout(sde, policy, [0, 1], deterministic=True, epoch=3)
    assert not bool(t.stochastic.any())
    torch.testing.assert_close(t.latents, rollout(ode, policy, [0, 1]).latents, rtol=0, atol=1e-6)


# --- per-sample noise ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,options", [("flow-sde", {"steps": 5}),
                                          ("flow-sde", {"steps": 6, "sde_window_size": 2}),
                                          ("dance-sde", {"steps": 5}),
                                          ("cps", {"steps": 6, "sde_window_size": 2}),
                                          ("ode", {"steps": 5})])
@pytest.mark.parametrize("make_policy", [AnalyticPolicy, lambda: ToyPolicy(seed=0, size=6, hidden=8)])
def test_a_sample_rolls_out_the_same_alone_or_in_any_batch(registry: Registry, name: str, options: dict[str, Any],
                                                            make_policy: Any) -> None:
    policy = make_policy()
    sampler = build(registry, name, **options)
    batch = rollout(sampler, policy, [0, 1, 2], epoch=1)
    reordered = rollout(sampler, policy, [2, 0], epoch=1)
    for r in range(3):
        alone = rollout(sampler, policy, [r], epoch=1)
        torch.testing.assert_close(alone.latents[0], batch.latents[r], rtol=0, atol=1e-6)
        torch.testing.assert_close(alone.log_probs[0], batch.log_probs[r], rtol=0, atol=1e-6)
    torch.testing.assert_close(reordered.latents, batch.latents[[2, 0]], rtol=0, atol=1e-6)


def test_randn_per_sample_rows_come_from_their_own_generator() -> None:
    rows = randn_per_sample((3, 2), make_generators([5, 6]))
    assert torch.equal(rows[0], torch.randn(3, 2, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(rows[1], torch.randn(3, 2, generator=torch.Generator().manual_seed(6)))
    assert rows.dtype == torch.float32
    assert randn_per_sample((4,), make_generators([1]), dtype=torch.float64).dtype == torch.float64


# --- errors -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,options,message", [
    ("flow-sde", {"steps": 8, "sde_window_size": 8}, "sde_window_size=8 exceeds the 7 steps that can be stochastic"),
    ("flow-sde", {"steps": 8, "sde_window_size": 9, "deterministic_last_step": False},
     "sde_window_size=9 exceeds the 8 steps"),
    ("flow-sde", {"steps": 8, "sde_window_range": (0, 2)}, "sde_window_range needs sde_window_size"),
    ("flow-sde", {"steps": 8, "sde_window_size": 3, "sde_window_range": (2, 6)}, "hi + size - 1 <= 7"),
    ("flow-sde", {"steps": 8, "sde_window_size": 2, "sde_window_range": (3, 3)}, "0 <= lo < hi"),
    ("flow-sde", {"steps": 8, "sde_window_size": 2, "sde_window_range": (-1, 2)}, "0 <= lo < hi"),
    ("flow-sde", {"steps": 1}, "greater than or equal to 2"),
    ("flow-sde", {"noise_level": 0.0}, "greater than 0"),
    ("flow-sde", {"sde_window_size": 0}, "greater than or equal to 1"),
    ("flow-sde", {"noise": 0.7}, "Extra inputs are not permitted"),
    ("dance-sde", {"eta": 0.0}, "greater than 0"),
    ("dance-sde", {"steps": 1}, "greater than or equal to 2"),
    ("dance-sde", {"steps": 6, "sde_window_size": 6}, "sde_window_size=6 exceeds the 5 steps"),
    ("dance-sde", {"steps": 6, "sde_window_size": 2, "sde_window_range": (4, 6)}, "hi + size - 1 <= 5"),
    ("dance-sde", {"noise_level": 0.7}, "Extra inputs are not permitted"),
    ("cps", {"noise_level": 0.0}, "greater than 0"),
    ("cps", {"noise_level": 1.5}, "less than or equal to 1"),
    ("cps", {"deterministic_last_step": False}, "deterministic_last_step must be true for cps"),
    ("cps", {"steps": 6, "sde_window_size": 6}, "sde_window_size=6 exceeds the 5 steps"),
    ("cps", {"steps": 8, "sde_window_range": (0, 2)}, "sde_window_range needs sde_window_size"),
    ("cps", {"eta": 0.3}, "Extra inputs are not permitted"),
    ("ode", {"steps": 0}, "greater than or equal to 1"),
    ("ode", {"noise_level": 0.7}, "Extra inputs are not permitted"),
])
def test_invalid_options_are_rejected_with_the_reason(registry: Registry, name: str, options: dict[str, Any],
                                                       message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace("+", r"\+")):
        registry.get("sampler", name).validate_options(options)


def test_largest_valid_window_and_range_are_accepted(registry: Registry) -> None:
    spec = registry.get("sampler", "flow-sde")
    assert spec.validate_options({"steps": 8, "sde_window_size": 7}).sde_window_size == 7
    assert spec.validate_options({"steps": 8, "sde_window_size": 3, "sde_window_range": (2, 5)}).sde_window_range == (2, 5)


def test_log_prob_errors_name_the_fix(registry: Registry) -> None:
    policy = AnalyticPolicy()
    cond = policy.encode(PROMPTS[:2])
    ode = build(registry, "ode", steps=3)
    with pytest.raises(ValueError, match="flow-sde"):
        ode.log_prob(policy, rollout(ode, policy, [0, 1]), 0, cond)
    sde = build(registry, "flow-sde", steps=3)
    with pytest.raises(ValueError, match="keep='steps'"):
        sde.log_prob(policy, rollout(sde, policy, [0, 1], keep="final"), 0, cond)


def test_keep_final_drops_states_but_not_the_sample(registry: Registry) -> None:
    policy = AnalyticPolicy()
    sampler = build(registry, "flow-sde", steps=5)
    full = rollout(sampler, policy, [0, 1])
    final = rollout(sampler, policy, [0, 1], keep="final")
    assert final.latents is None and final.log_probs is None
    assert torch.equal(final.final, full.final)
    assert np.array_equal(final.stochastic.numpy(), full.stochastic.numpy())
