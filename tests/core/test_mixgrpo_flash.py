"""MixGRPO-Flash: `ode_solver: dpm-solver++2m` on the SDE samplers integrates the deterministic steps after the SDE
window with DPM-Solver++(2M) instead of Euler; every other step, the log-probabilities and eval rollouts stay.

The 2M update is written out here in DPM-Solver++'s own form (Lu et al. 2022, Algorithm 2: exponential
integrator in lambda = log(alpha / sigma) on the data prediction, alpha = 1 - sigma for a rectified flow), and
checked on a flow whose exact ODE solution is known: data N(mu, s^2) per dimension, where the optimal velocity is
analytic and the ODE maps x at sigma_a to mu + s (x - (1 - sigma_a) mu) / sqrt((1 - sigma_a)^2 s^2 + sigma_a^2).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from flowfactory.registry import BuildContext, Registry
from flowfactory.testing import SamplerContract, load_registry, make_generators

DPM = "dpm-solver++2m"


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry()


def build(registry: Registry, name: str = "flow-sde", **options: Any):
    return registry.get("sampler", name).create(options, BuildContext(seed=0))


def dpm_pp_2m(x: torch.Tensor, v: torch.Tensor, x0_prev: torch.Tensor | None, sigmas: torch.Tensor,
              i: int) -> torch.Tensor:
    """One DPM-Solver++(2M) step (midpoint form) from sigma_i to sigma_{i+1}; first order without a previous data
    prediction, and the step to sigma 0 first order (its lambda is infinite), as DPM-Solver++ ends."""
    s0, s1 = float(sigmas[i]), float(sigmas[i + 1])
    m0 = x - s0 * v  # data prediction
    if s1 == 0.0:
        return m0  # sigma_t / sigma_s x - alpha_t (e^{-h} - 1) D with sigma_t = 0, alpha_t = 1, e^{-h} = 0
    lam0, lam1 = math.log((1 - s0) / s0), math.log((1 - s1) / s1)
    h = lam1 - lam0
    if x0_prev is None:
        d = m0
    else:
        sp = float(sigmas[i - 1])
        lam_p = -math.inf if sp >= 1.0 else math.log((1 - sp) / sp)  # alpha = 0 at sigma 1: r0 = inf, first order
        r0 = (lam0 - lam_p) / h
        d = m0 + 0.5 / r0 * (m0 - x0_prev)
    return (s1 / s0) * x - (1 - s1) * (math.exp(-h) - 1) * d


class GaussianDataFlow:
    """A policy whose velocity is the exact one of data N(mu, s^2) per dimension: E[eps - x_0 | x_sigma]."""

    latent_shape = (48,)

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.mu = torch.randn(48, generator=g, dtype=torch.float64)
        self.s = 0.5 + torch.rand(48, generator=g, dtype=torch.float64)

    def sigmas(self, steps: int) -> torch.Tensor:
        return torch.linspace(1.0, 0.0, steps + 1)

    def _std(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return torch.sqrt((1 - sigma) ** 2 * self.s**2 + torch.as_tensor(sigma, dtype=torch.float64) ** 2)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        sig, xd = sigma.double().reshape(-1, 1), x.double()
        x0 = self.mu + (1 - sig) * self.s**2 / self._std(sig) ** 2 * (xd - (1 - sig) * self.mu)
        return ((xd - x0) / sig).to(x.dtype)

    def exact(self, x: torch.Tensor, sigma_a: float) -> torch.Tensor:
        """The ODE solution at sigma 0 through x at sigma_a."""
        return self.mu + self.s * (x.double() - (1 - sigma_a) * self.mu) / self._std(sigma_a)


def test_2m_step_is_dpm_solver_pp_written_out() -> None:
    from flowfactory.samplers.flow import dpm_solver_2m_step

    g = torch.Generator().manual_seed(3)
    sigmas = torch.tensor([1.0, 0.93, 0.8, 0.61, 0.4, 0.17, 0.0], dtype=torch.float64)
    x, v, prev = (torch.randn(2, 5, generator=g, dtype=torch.float64) for _ in range(3))
    for i in range(1, len(sigmas) - 1):
        assert torch.allclose(dpm_solver_2m_step(x, v, prev, sigmas, i), dpm_pp_2m(x, v, prev, sigmas, i),
                              rtol=0, atol=1e-12), f"step {i}"
        euler = x + (sigmas[i + 1] - sigmas[i]) * v  # DPM-Solver++'s first order step is Euler for this flow
        assert torch.allclose(dpm_solver_2m_step(x, v, None, sigmas, i), euler, rtol=0, atol=1e-12)
        assert torch.allclose(dpm_pp_2m(x, v, None, sigmas, i), euler, rtol=0, atol=1e-12)


def flash_errors(steps: int) -> dict[str, float]:
    """Max error of the final sample against the exact ODE solution from the state after a one-step window."""
    policy, out = GaussianDataFlow(), {}
    noise = torch.randn(4, 48, generator=torch.Generator().manual_seed(1))
    for solver in ("euler", DPM):
        from flowfactory.samplers import FlowSDEOptions
        from flowfactory.samplers.flow import FlowSDESampler

        sampler = FlowSDESampler(FlowSDEOptions(steps=steps, sde_window_size=1, sde_window_range=(0, 1),
                                                ode_solver=solver))
        t = sampler.rollout(policy, {}, noise, make_generators([5, 6, 7, 8]), epoch=1)
        assert t.stochastic_steps() == [0]
        out[solver] = float((t.final.double() - policy.exact(t.latents[:, 1], float(t.sigmas[1]))).abs().max())
    return out


@pytest.mark.parametrize("steps", [12, 24])
def test_second_order_error_is_far_below_euler(steps: int) -> None:
    err = flash_errors(steps)
    assert err[DPM] < err["euler"] / 8, err  # measured: 12 steps 0.36 vs 0.022, 24 steps 0.19 vs 0.014


def test_rollout_after_the_window_is_the_2m_recurrence() -> None:
    """The rollout's states after the window are the written-out recurrence started afresh after the window (its
    first step Euler), fed with the policy's velocity at each stored state."""
    from flowfactory.samplers import FlowSDEOptions
    from flowfactory.samplers.flow import FlowSDESampler

    policy = GaussianDataFlow()
    sampler = FlowSDESampler(FlowSDEOptions(steps=10, sde_window_size=3, sde_window_range=(2, 3), ode_solver=DPM))
    t = sampler.rollout(policy, {}, torch.randn(3, 48, generator=torch.Generator().manual_seed(2)),
                        make_generators([1, 2, 3]), epoch=1)
    assert t.stochastic_steps() == [2, 3, 4]
    prev = None
    for i in range(5, 10):
        x = t.latents[:, i].double()
        v = policy.velocity(t.latents[:, i], torch.full((3,), float(t.sigmas[i])), None).double()
        assert torch.allclose(t.latents[:, i + 1].double(), dpm_pp_2m(x, v, prev, t.sigmas.double(), i),
                              rtol=0, atol=2e-5), f"step {i}"
        prev = x - float(t.sigmas[i]) * v


def toy(registry: Registry):
    return registry.get("policy", "toy").create({"size": 8, "hidden": 16, "shift": 3.0}, BuildContext(seed=0))


def rollout(sampler: Any, policy: Any, epoch: int = 1, **kwargs: Any):
    cond = policy.encode(["a red square", "a blue circle", "a green triangle"])
    noise = policy.noise(make_generators([100, 101, 102]))
    return sampler.rollout(policy, cond, noise, make_generators([200, 201, 202]), epoch=epoch, **kwargs)


@pytest.mark.parametrize("name", ["flow-sde", "dance-sde", "cps"])
def test_default_is_euler_after_the_window(registry: Registry, name: str) -> None:
    """Unset, `ode_solver` is euler: the rollout equals an explicit `euler`, bit for bit, and every step after the
    window is x + (sigma_{i+1} - sigma_i) v of the stored state."""
    policy = toy(registry)
    opts = {"steps": 7, "sde_window_size": 2, "sde_window_range": (1, 2)}
    default, euler = build(registry, name, **opts), build(registry, name, **opts, ode_solver="euler")
    a, b = rollout(default, policy), rollout(euler, policy)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert a.stochastic_steps() == [1, 2]
    cond = policy.encode(["a red square", "a blue circle", "a green triangle"])
    for i in range(3, 7):
        x = a.latents[:, i]
        v = policy.velocity(x, torch.full((3,), float(a.sigmas[i])), cond).float()
        assert torch.equal(a.latents[:, i + 1], (x.float() + (float(a.sigmas[i + 1]) - float(a.sigmas[i])) * v).to(x.dtype))


@pytest.mark.parametrize("name", ["flow-sde", "dance-sde"])
def test_only_steps_after_the_window_change(registry: Registry, name: str) -> None:
    """Up to the first step after the window (Euler: the multistep history starts there) the rollout and its
    log-probabilities are bit-identical to Euler's; after it they differ; eval (deterministic) stays Euler."""
    policy = toy(registry)
    opts = {"steps": 8, "sde_window_size": 2, "sde_window_schedule": {"type": "sliding", "every_epochs": 1}}
    euler, flash = build(registry, name, **opts), build(registry, name, **opts, ode_solver=DPM)
    for epoch in (1, 2, 3):
        a, b = rollout(euler, policy, epoch), rollout(flash, policy, epoch)
        end = a.stochastic_steps()[-1] + 1  # the window's end: x_end is its last sample
        assert torch.equal(a.stochastic, b.stochastic) and torch.equal(a.log_probs, b.log_probs)
        assert torch.equal(a.latents[:, :end + 2], b.latents[:, :end + 2])
        assert (a.latents[:, end + 2:] - b.latents[:, end + 2:]).abs().amax() > 1e-6
        ea, eb = rollout(euler, policy, epoch, deterministic=True), rollout(flash, policy, epoch, deterministic=True)
        assert torch.equal(ea.latents, eb.latents)


@pytest.mark.parametrize("options,match", [
    ({"steps": 8, "sde_window_size": 2, "ode_solver": "rk4"}, "ode_solver"),
    ({"steps": 8, "ode_solver": DPM}, "ode_solver=dpm-solver\\+\\+2m .* needs sde_window_size"),
])
def test_bad_ode_solver_is_a_config_error(registry: Registry, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        registry.get("sampler", "flow-sde").options(**options)


class TestFlowSDEFlashContract(SamplerContract):
    component = "flow-sde"
    options = {"steps": 7, "sde_window_size": 2, "ode_solver": DPM,
               "sde_window_schedule": {"type": "sliding", "every_epochs": 1}}
    epochs = (1, 2, 3, 4)  # window starts 0..3: four, three, two and one steps after it


class TestDanceSDEFlashContract(SamplerContract):
    component = "dance-sde"
    options = {"steps": 6, "sde_window_size": 1, "eta": 0.5, "ode_solver": DPM}
    epochs = (0, 1, 2)
