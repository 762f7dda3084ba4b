"""Euler ODE and SDE samplers (Flow-GRPO, DanceGRPO, CPS) for rectified-flow policies.

Convention: x_sigma = (1 - sigma) x_0 + sigma * eps, the policy predicts v = eps - x_0, and an ODE step is
x_next = x + (sigma_next - sigma) v. The SDE samplers' `ode_solver: dpm-solver++2m` (MixGRPO-Flash) integrates
the deterministic steps after the SDE window with `dpm_solver_2m_step` instead.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import numpy as np
import torch

from flowfactory.samplers import CPSOptions, DanceSDEOptions, FlowSDEOptions, SDEWindowOptions
from flowfactory.seeding import randn_per_sample
from flowfactory.types import Conditioning, Policy, StepDistribution, Trajectory

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) averaged over all but the batch dim, in float32 (Flow-GRPO's reduction)."""
    x, mean = x.float(), mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def sliding_window_start(epoch: int, lo: int, hi: int, *, stride: int, every_epochs: int, restart: bool) -> int:
    """MixGRPO's sliding window start at `epoch` (the loop counts epochs from 1; epoch 0 is epoch 1).

    The start is `lo` for the first `every_epochs` epochs and moves `stride` steps after each further
    `every_epochs`; its positions are lo, lo + stride, ... below `hi`. After the last one it starts over at
    `lo` (`restart`) or stays at `hi - 1`, the last start (min(l + s, hi - 1), as MixGRPO's clamp)."""
    shifts = max(epoch - 1, 0) // every_epochs
    if restart:
        positions = (hi - 1 - lo) // stride + 1
        return lo + (shifts % positions) * stride
    return min(lo + shifts * stride, hi - 1)


def dpm_solver_2m_step(x: torch.Tensor, v: torch.Tensor, x0_prev: torch.Tensor | None, sigmas: torch.Tensor,
                       i: int) -> torch.Tensor:
    """x_{i+1} by DPM-Solver++(2M) (Lu et al. 2022, multistep, second order) for a rectified flow, from x = x_i, its
    velocity v and `x0_prev`, the data prediction x_{i-1} - sigma_{i-1} v_{i-1} of the previous step of the same ODE
    solution (None: none yet). With alpha = 1 - sigma, lambda = log(alpha / sigma), h = lambda_{i+1} - lambda_i,
    r = (lambda_i - lambda_{i-1}) / h and the data prediction x0 = x - sigma_i v, the update
        x_{i+1} = sigma_{i+1} / sigma_i x + (alpha_{i+1} - alpha_i sigma_{i+1} / sigma_i) (x0 + (x0 - x0_prev) / (2 r))
    is the Euler step (DPM-Solver++'s first order one, for this flow) plus its second-order term. It falls back to
    Euler without a previous step and at the step to sigma 0 (lambda = inf there, as DPM-Solver++'s final step)."""
    s, t = float(sigmas[i]), float(sigmas[i + 1])
    euler = x + (t - s) * v
    if x0_prev is None or t <= 0.0 or i == 0 or float(sigmas[i - 1]) >= 1.0:
        return euler
    p = float(sigmas[i - 1])

    def lam(sigma: float) -> float:
        return math.log((1.0 - sigma) / sigma)

    r = (lam(s) - lam(p)) / (lam(t) - lam(s))
    coef = (1.0 - t) - (1.0 - s) * t / s  # alpha_t - alpha_s sigma_t / sigma_s = -alpha_t (e^{-h} - 1)
    return euler + (coef / (2.0 * r)) * ((x - s * v) - x0_prev)


def _sigma_batch(sigma: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(sigma), device=x.device, dtype=torch.float32)


class _BaseSampler(ABC):
    """What `ODESampler` and `SDESampler` share: the rollout loop, the log-prob of a kept step, and the
    deterministic step `ode_step` (Euler)."""

    steps: int
    stochastic: bool = True  # capability: has stochastic steps with log-probs
    sde_type: ClassVar[str | None] = None  # capability: which SDE its stochastic steps follow (None: unnamed)

    def stochastic_mask(self, epoch: int) -> torch.Tensor:
        """[steps] bool: which steps of a rollout at `epoch` are sampled with noise."""
        return torch.zeros(self.steps, dtype=torch.bool)

    def multistep_mask(self, stochastic: torch.Tensor) -> torch.Tensor:
        """[steps] bool: the deterministic steps a rollout with this stochastic mask integrates with
        `dpm_solver_2m_step` rather than `ode_step` (none here; the SDE samplers' `ode_solver`)."""
        return torch.zeros_like(stochastic)

    def ode_step(self, x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, i: int) -> torch.Tensor:
        """x_{i+1} of a deterministic step from x = x_i and its velocity v (both float32): the Euler step
        x + (sigma_{i+1} - sigma_i) v. Override it for another deterministic integrator."""
        return x + (float(sigmas[i + 1]) - float(sigmas[i])) * v

    @abstractmethod
    def step_distribution(self, policy: Policy, x: torch.Tensor, sigmas: torch.Tensor, i: int,
                          cond: Conditioning, stochastic: bool = True) -> StepDistribution:
        """The Gaussian of x_{i+1} given x = x_i (the `Sampler` protocol)."""

    @torch.no_grad()
    def rollout(self, policy: Policy, cond: Conditioning, noise: torch.Tensor,
                generators: list[torch.Generator], *, keep: Literal["steps", "final"] = "steps",
                deterministic: bool = False, epoch: int = 0) -> Trajectory:
        sigmas = policy.sigmas(self.steps).to(torch.float32).cpu()
        mask = torch.zeros(self.steps, dtype=torch.bool) if deterministic else self.stochastic_mask(epoch)
        multistep = self.multistep_mask(mask)
        x = noise
        x0_prev = None  # the previous multistep step's data prediction: this rollout's own history, per row
        states = [x] if keep == "steps" else None
        log_probs = torch.zeros(x.shape[0], self.steps, dtype=torch.float32, device=x.device) if keep == "steps" else None
        for i in range(self.steps):
            if multistep[i]:
                xf, sigma = x.float(), float(sigmas[i])
                v = policy.velocity(x, _sigma_batch(sigma, x), cond).float()
                x_next = dpm_solver_2m_step(xf, v, x0_prev, sigmas, i).to(x.dtype)
                x0_prev = xf - sigma * v
            elif mask[i]:
                dist = self.step_distribution(policy, x, sigmas, i, cond, stochastic=True)
                eps = randn_per_sample(tuple(x.shape[1:]), generators, device=x.device, dtype=torch.float32)
                x_next = (dist.mean.float() + dist.std * eps).to(x.dtype)
                if log_probs is not None:
                    log_probs[:, i] = gaussian_log_prob(x_next, dist.mean, dist.std)
            else:
                x_next = self.step_distribution(policy, x, sigmas, i, cond, stochastic=False).mean.to(x.dtype)
            x = x_next
            if states is not None:
                states.append(x)
        latents = torch.stack(states, dim=1) if states is not None else None
        return Trajectory(sigmas=sigmas, stochastic=mask, final=x, latents=latents, log_probs=log_probs)

    def log_prob(self, policy: Policy, trajectory: Trajectory, step: int, cond: Conditioning) -> StepDistribution:
        if trajectory.latents is None:
            raise ValueError("this trajectory kept no per-step latents (keep='final'); log-probs need keep='steps'")
        x = trajectory.latents[:, step]
        x_next = trajectory.latents[:, step + 1]
        dist = self.step_distribution(policy, x, trajectory.sigmas, step, cond, stochastic=True)
        dist.log_prob = gaussian_log_prob(x_next, dist.mean, dist.std)
        return dist


class ODESampler(_BaseSampler):
    """A deterministic sampler: every step is `ode_step` (Euler here), with std 0 and no log-prob.

    The built-in `ode` sampler is this class. A new ODE sampler subclasses it and defines only `ode_step`;
    `rollout`, `step_distribution` and `log_prob` (which raises ValueError) come with it."""

    stochastic = False

    def __init__(self, steps: int):
        self.steps = steps

    def step_distribution(self, policy: Policy, x: torch.Tensor, sigmas: torch.Tensor, i: int,
                          cond: Conditioning, stochastic: bool = True) -> StepDistribution:
        v = policy.velocity(x, _sigma_batch(float(sigmas[i]), x), cond).float()
        return StepDistribution(mean=self.ode_step(x.float(), v, sigmas, i), std=torch.zeros((), device=x.device))

    def log_prob(self, policy, trajectory, step, cond):
        raise ValueError(f"{type(self).__name__} is a deterministic (ODE) sampler and has no log-probabilities; "
                         f"use `flow-sde` for algorithms that need them (grpo)")


class SDESampler(_BaseSampler):
    """Base of the SDE samplers (`flow-sde`, `dance-sde`, `cps`): options, the SDE window (`stochastic_mask`),
    `ode_step` (Euler) at deterministic steps, DPM-Solver++(2M) after the window with `ode_solver: dpm-solver++2m`
    (`multistep_mask`), and the rollout and log-prob. A new SDE sampler subclasses it, takes options subclassing
    `flowfactory.samplers.SDEWindowOptions`, and defines only `sde_step`.

    `step_distribution(..., stochastic=False)` is the single-step Euler step: a multistep step depends on the
    previous one as well, so only the rollout takes it."""

    def __init__(self, options: SDEWindowOptions, seed: int = 0):
        self.options = options
        self.steps = options.steps
        self.seed = seed

    def stochastic_mask(self, epoch: int) -> torch.Tensor:
        """Which steps are stochastic at `epoch`: all (but a deterministic last one), or a window of
        `sde_window_size` steps whose start is drawn from (seed, epoch), or slid by epoch (`sde_window_schedule`):
        a function of (options, seed, epoch) only, so every process and a resumed run agree on it."""
        o = self.options
        last = self.steps - (1 if o.deterministic_last_step else 0)
        mask = torch.zeros(self.steps, dtype=torch.bool)
        if o.sde_window_size is None:
            mask[:last] = True
            return mask
        if o.sde_window_schedule is not None:
            lo, hi = o.sde_window_range or (0, last - o.sde_window_size + 1)
            s = o.sde_window_schedule
            start = sliding_window_start(epoch, lo, hi, stride=s.stride, every_epochs=s.every_epochs,
                                         restart=s.restart)
        else:
            lo, hi = o.sde_window_range or (0, max(1, min(self.steps // 2, last - o.sde_window_size + 1)))
            rng = np.random.default_rng([self.seed, epoch, 7919])
            start = int(rng.integers(lo, hi))
        mask[start:start + o.sde_window_size] = True
        return mask

    def multistep_mask(self, stochastic: torch.Tensor) -> torch.Tensor:
        """With `ode_solver: dpm-solver++2m` (MixGRPO-Flash), every step after the last stochastic one; before and
        inside the window (and in a rollout with no stochastic step, eval) the steps stay `ode_step`'s."""
        multistep = torch.zeros_like(stochastic)
        if self.options.ode_solver == "dpm-solver++2m" and bool(stochastic.any()):
            multistep[int(stochastic.nonzero().max()) + 1:] = True
        return multistep

    def step_distribution(self, policy: Policy, x: torch.Tensor, sigmas: torch.Tensor, i: int,
                          cond: Conditioning, stochastic: bool = True) -> StepDistribution:
        v = policy.velocity(x, _sigma_batch(float(sigmas[i]), x), cond).float()
        xf = x.float()
        if not stochastic:
            return StepDistribution(mean=self.ode_step(xf, v, sigmas, i), std=torch.zeros((), device=x.device))
        mean, std = self.sde_step(xf, v, sigmas, i)
        return StepDistribution(mean=mean, std=torch.as_tensor(std, device=x.device, dtype=torch.float32))

    @abstractmethod
    def sde_step(self, x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor,
                 i: int) -> tuple[torch.Tensor, float]:
        """(mean, std) of x_{i+1} ~ N(mean, std^2) given x = x_i and its velocity v (both float32, [B, *latent]);
        `sigmas` is the schedule ([steps + 1], descending to 0). std is a positive float shared by the batch."""


class FlowSDESampler(SDESampler):
    """Flow-GRPO's SDE: the reverse-time SDE with the same marginals as the flow ODE.

    std_t = a * sqrt(sigma / (1 - sigma))  (sigma = 1 uses the schedule's second sigma in the denominator)
    mean  = x (1 + std_t^2 / (2 sigma) dt) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt,   dt = sigma_next - sigma < 0
    x_next = mean + std_t sqrt(-dt) eps
    """

    sde_type = "flow-sde"

    def __init__(self, options: FlowSDEOptions, seed: int = 0):
        super().__init__(options, seed)
        self.noise_level = options.noise_level

    def sde_step(self, x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor,
                  i: int) -> tuple[torch.Tensor, float]:
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        dt = sigma_next - sigma
        denom_sigma = float(sigmas[1]) if sigma >= 1.0 else sigma
        std_t = math.sqrt(sigma / (1.0 - denom_sigma)) * self.noise_level
        mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
        return mean, std_t * math.sqrt(-dt)


class DanceSDESampler(SDESampler):
    """DanceGRPO's SDE step (its FLUX script's `flux_step` with `sde_solver=True`).

    Euler plus a score correction with a constant diffusion coefficient eta, dt = sigma_next - sigma < 0:
        x0_hat = x - sigma v,   score = -(x - (1 - sigma) x0_hat) / sigma^2
        mean   = x + dt v - eta^2 / 2 * score * dt,   std = eta sqrt(-dt),   x_next = mean + std eps
    The log-prob is the full Gaussian density averaged over latent dims. (DanceGRPO's own code ends up with
    only the quadratic term, its constants being on a separate, discarded line; they cancel in GRPO's ratio.)
    """

    sde_type = "dance-sde"

    def __init__(self, options: DanceSDEOptions, seed: int = 0):
        super().__init__(options, seed)
        self.eta = options.eta

    def sde_step(self, x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor,
                  i: int) -> tuple[torch.Tensor, float]:
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        dt = sigma_next - sigma
        x0_hat = x - sigma * v
        score = -(x - (1 - sigma) * x0_hat) / sigma**2
        mean = x + dt * v + (-0.5 * self.eta**2 * score) * dt
        return mean, self.eta * math.sqrt(-dt)


class CPSSampler(SDESampler):
    """Coefficients-Preserving Sampling (Wang & Yu 2025; Flow-GRPO's `sde_type="cps"`).

    Re-noises the predicted clean sample so that x_next has exactly the coefficients of sigma_next:
        std    = sigma_next sin(a pi / 2)
        x0_hat = x - sigma v,   eps_hat = x + (1 - sigma) v
        mean   = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) eps_hat,   x_next = mean + std eps
    The last step (sigma_next = 0) has std 0 and is the Euler step, so it is always deterministic.

    Deviation from Flow-GRPO: its CPS log-prob is -(x_next - mean)^2 averaged over dims (no 1 / (2 std^2),
    no constants). Here it is the Gaussian log density averaged over dims, like the other SDE samplers, so
    the log-ratio is 1 / (2 std^2) times Flow-GRPO's; a clip range tuned there does not carry over as is.
    """

    sde_type = "cps"

    def __init__(self, options: CPSOptions, seed: int = 0):
        super().__init__(options, seed)
        self.noise_level = options.noise_level

    def sde_step(self, x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor,
                  i: int) -> tuple[torch.Tensor, float]:
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        std = sigma_next * math.sin(self.noise_level * math.pi / 2)
        x0_hat = x - sigma * v
        eps_hat = x + (1 - sigma) * v
        mean = (1 - sigma_next) * x0_hat + math.sqrt(max(sigma_next**2 - std**2, 0.0)) * eps_hat
        return mean, std
