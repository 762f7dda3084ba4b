"""Advantage Weighted Matching's objective (Xue et al. 2025; reference scxue/advantage_weighted_matching,
`scripts/train_sd3_awm.py`).

AWM samples with any (here: deterministic ODE) sampler and keeps only the final latents x0. For every
micro-batch it draws K noise levels t (`units`) and for each a fresh eps, and uses the flow-matching error
against the forward-process target as the log-likelihood surrogate:

    x_t = (1 - t) x0 + t eps,    e = mean over latent dims of (v_theta(x_t, t) - (eps - x0))^2
    log p = -w(e, t):  uniform e | t e | t^2 e | huber t (sqrt(e + d) - sqrt(d)) | ghuber t ((e + d)^p - d^p) / p
    r = exp(log p_theta - log p_old)     (log p_old: the sampling policy, same x_t and eps, no grad)
    A = clip(A, -c_A, c_A) [* advantage_max / c_A]
    L = max(-A r, -A clip(r, 1 - c, 1 + c))  +  kl_beta KL_ref  +  ema_kl_beta KL_ema
    KL_x = mean over latent dims of (v_theta - v_x)^2   [/ (2 std_t^2), std_t = 0.7 sqrt(t / (1 - min(t, 0.99)))]

Errors and log-likelihoods are computed in float64, as the reference does. Every draw comes from a generator
seeded by the run seed and `TrainBatch` keys (epoch, inner epoch, global sample index), never from torch's
global RNG, so a resumed run equals an uninterrupted one. Noise eps, and `uniform` times, are drawn per
rollout from its own key, whatever its micro-batch or process; `discrete` and `logit_normal` times are shared,
as the reference shares them within a micro-batch, but drawn from the key of the whole pass (`pass_key`), so
every micro-batch of the pass trains at the same K times and the update does not depend on the micro-batch size
or the process count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from flowfactory.algorithms import ParamSnapshot, clip_advantages, clipped_surrogate, shift_times
from flowfactory.errors import FlowFactoryError
from flowfactory.seeding import randn_per_sample, sample_seed
from flowfactory.train.ema import EMA
from flowfactory.train.state import named_trainable
from flowfactory.types import LossOutput, OptimizerHooks, Policy, Requirements, Sampler, TrainBatch

_STREAM = 0x41574D  # "AWM": keeps this optimizer's seeds apart from the loop's (seed, epoch, index) seeds
_SHARED = 0x41574E  # the stream of times shared by a whole pass (keyed by the pass, not a rollout)


@dataclass
class AWMUnit:
    """One work unit: the k-th sampled noise level of a micro-batch.

    times: [B] float32 noise level per row; noise_seeds: per row, the seed of this unit's eps [*latent]."""

    index: int
    times: torch.Tensor
    noise_seeds: tuple[int, ...]


def weighted_log_likelihood(err: torch.Tensor, t: torch.Tensor, weighting: str, delta: float = 1e-10,
                            power: float = 0.25) -> torch.Tensor:
    """The AWM log-likelihood surrogate from the per-sample flow-matching error `err` [B] at times `t` [B]
    (reference `compute_log_prob_awm`)."""
    t = t.to(err.dtype)
    if weighting == "uniform":
        return -err
    if weighting == "t":
        return -err * t
    if weighting == "t^2":
        return -err * t**2
    if weighting == "huber":
        return -(torch.sqrt(err + delta) - delta**0.5) * t
    if weighting == "ghuber":
        return -(torch.pow(err + delta, power) - delta**power) * t / power
    raise ValueError(f"unknown AWM weighting {weighting!r}")


def elbo_std(t: torch.Tensor) -> torch.Tensor:
    """The reference's per-time std of the `elbo` KL weighting: 0.7 sqrt(t / (1 - min(t, 0.99)))."""
    return torch.sqrt(t / (1 - torch.clamp(t, 0, 0.99))) * 0.7


def sample_times(kind: str, k: int, b: int, gen: torch.Generator, *, sigmas: torch.Tensor | None = None,
                 shift: float = 3.0, fraction: float = 0.9, lo: float = 0.2, hi: float = 1.0, mean: float = 0.0,
                 std: float = 1.0, t_min: float = 0.01) -> torch.Tensor:
    """[k, b] float32 noise levels, drawn as the reference's `time_type` does (stratified over the k units)."""
    if kind == "logit_normal":
        u = (torch.arange(k, dtype=torch.float64) + torch.rand(k, generator=gen, dtype=torch.float64)) / k
        z = torch.distributions.Normal(0.0, 1.0).icdf(u.clamp(1e-7, 1 - 1e-7))
        z = z[torch.randperm(k, generator=gen)]
        t = shift_times(torch.sigmoid(z * std + mean), shift)
        return t.clamp(min=t_min).float()[:, None].expand(k, b).contiguous()
    if kind == "uniform":
        u = (torch.arange(k, dtype=torch.float64)[:, None] + torch.rand(k, b, generator=gen, dtype=torch.float64)) / k
        m = lo + u * (hi - lo)
        m = torch.gather(m, 0, torch.rand(k, b, generator=gen).argsort(dim=0))  # shuffle each column
        return shift_times(m, shift).float()
    if kind == "discrete":
        if sigmas is None:
            raise ValueError("discrete times need the sampler's sigmas")
        steps = len(sigmas) - 1
        bounds = torch.linspace(1, int(steps * fraction), k + 1, dtype=torch.float32)
        lower, upper = bounds[:-1].long(), bounds[1:].long()
        idx = lower + (torch.rand(k, generator=gen) * (upper - lower)).long()
        return sigmas.detach().float().cpu()[idx][:, None].expand(k, b).contiguous()
    raise ValueError(f"unknown AWM time_type {kind!r}")


class AWM(OptimizerHooks):
    """The `awm` policy optimizer (see the module docstring for the objective)."""

    def __init__(self, options: Any, seed: int = 0):
        self.options = options
        # the KL to the reference needs policy.reference(); the KL to the EMA policy does not
        self.requirements = Requirements(keep="final", stochastic=False, reference=options.kl_beta > 0)
        self.seed = int(seed)
        self.steps = 0  # optimizer steps taken (the linear EMA decay schedule counts them)
        self.ema_steps = 0  # optimizer steps already folded into the EMA policy
        self.ema: EMA | None = None  # the EMA policy (KL-EMA and off-policy sampling)
        self._old: ParamSnapshot | None = None  # the sampling policy's parameters, taken in on_rollout

    # --- setup and hooks ------------------------------------------------------------------------------------
    @property
    def _needs_ema(self) -> bool:
        return self.options.ema_kl_beta > 0 or self.options.off_policy

    def setup(self, policy: Policy, sampler: Sampler) -> None:
        """Start the EMA policy at the current weights (AWM works with any sampler)."""
        super().setup(policy, sampler)
        self._parameters(policy)

    def _parameters(self, policy: Policy) -> dict[str, torch.Tensor]:
        """The named trainable parameters, looked up now (sharding replaces them); creates the EMA policy on
        first use."""
        params = named_trainable(policy)
        if self._needs_ema and self.ema is None:
            self.ema = EMA(params, self.options.ema_decay)
        return params

    def _ema_decay(self) -> float:
        o = self.options
        return o.ema_decay if o.ema_decay_schedule == "constant" else min(o.ema_decay, 0.001 * self.steps)

    def _update_ema(self, policy: Policy) -> None:
        params = self._parameters(policy)
        if self.ema is None or self.ema_steps == self.steps:
            return
        self.ema.decay = self._ema_decay()
        self.ema.update(params)
        self.ema_steps = self.steps

    def sampling(self, policy: Policy) -> Any:
        """Roll out with the EMA policy when `off_policy`."""
        params = self._parameters(policy)
        if self.options.off_policy and self.ema is not None:
            return self.ema.swapped(params)
        return nullcontext()

    def on_rollout(self, policy: Policy) -> None:
        """Snapshot the sampling policy: the `old` policy of the ratio for this epoch's non-fresh batches."""
        if not self.options.off_policy:
            self._old = ParamSnapshot.retake(self._old, self._parameters(policy))

    def on_step(self, policy: Policy) -> None:
        self.steps += 1
        if self.options.ema_update == "step":
            self._update_ema(policy)

    def on_epoch_end(self, policy: Policy) -> None:
        """Fold the epoch's steps into the EMA policy with `ema_update: epoch`, as the reference does."""
        if self.options.ema_update == "epoch":
            self._update_ema(policy)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "ema_steps": self.ema_steps,
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's state; `setup` comes first (it creates the EMA policy this fills)."""
        if self._needs_ema and self.ema is None and state.get("ema") is not None:
            raise FlowFactoryError("optimizer `awm`: load_state_dict(state) needs setup(policy, sampler) first, "
                                   "which creates the EMA policy the state fills (the loop calls them in that order)")
        self.steps, self.ema_steps = int(state["steps"]), int(state["ema_steps"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])

    # --- the loss ---------------------------------------------------------------------------------------------
    def units(self, batch: TrainBatch) -> list[AWMUnit]:
        """K noise levels per rollout (stratified over the K units) and their noise seeds, from the rows' keys."""
        o = self.options
        keys = [(self.seed, _STREAM, *key) for key in batch.row_keys()]

        def times_for(b: int, key: tuple[int, ...]) -> torch.Tensor:
            return sample_times(o.time_type, o.num_times, b, torch.Generator().manual_seed(sample_seed(*key, 0)),
                                sigmas=batch.trajectory.sigmas, shift=o.time_shift, fraction=o.timestep_fraction,
                                lo=o.time_min, hi=o.time_max, mean=o.logit_mean, std=o.logit_std,
                                t_min=o.logit_t_min)

        if o.time_type == "uniform":  # per rollout
            times = torch.cat([times_for(1, key) for key in keys], dim=1)
        else:  # one time per unit shared by the rows, as the reference; drawn from the pass's key, so neither the
            # micro-batch size nor the process count changes which times a rollout trains at
            times = times_for(len(keys), (self.seed, _SHARED, *batch.pass_key()))
        return [AWMUnit(index=k, times=times[k], noise_seeds=tuple(sample_seed(*key, k + 1) for key in keys))
                for k in range(o.num_times)]

    @contextmanager
    def _old_policy(self, policy: Policy) -> Iterator[None]:
        """Inside: the old (sampling) policy's weights, under no grad."""
        snap = self.ema if self.options.off_policy else self._old
        with torch.no_grad(), (snap.swapped(self._parameters(policy)) if snap is not None else nullcontext()):
            yield

    def loss(self, policy: Policy, sampler: Sampler, batch: TrainBatch, unit: AWMUnit) -> LossOutput:
        o = self.options
        x0 = batch.trajectory.final
        eps = randn_per_sample(tuple(x0.shape[1:]), [torch.Generator().manual_seed(s) for s in unit.noise_seeds],
                               device=x0.device, dtype=x0.dtype)
        t = unit.times.to(x0.device)
        tb = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        x_t = (1 - tb) * x0 + tb * eps
        target = (eps.double() - x0.double())
        dims = tuple(range(1, x0.ndim))
        t64 = t.double()

        def log_p(v: torch.Tensor) -> torch.Tensor:
            err = ((v.double() - target) ** 2).mean(dim=dims)
            return weighted_log_likelihood(err, t64, o.weighting, o.huber_delta, o.ghuber_power)

        # Swapped-in policies first: a swap writes the parameters in place, which must not happen between
        # the forward with grad and its backward.
        old_needed = o.off_policy or not batch.fresh
        if old_needed:
            if not o.off_policy and self._old is None:
                raise RuntimeError("optimizer `awm` got a non-fresh batch before any rollout snapshot "
                                   "(on_rollout was not called)")
            with self._old_policy(policy):
                old = log_p(policy.velocity(x_t, t, batch.cond))
        v_ema = None
        if o.ema_kl_beta > 0:
            assert self.ema is not None
            with torch.no_grad(), self.ema.swapped(self._parameters(policy)):
                v_ema = policy.velocity(x_t, t, batch.cond)
        v = policy.velocity(x_t, t, batch.cond)
        lp = log_p(v)
        if not old_needed:  # fresh: the policy is still the sampling one, so log p_old = log p_theta exactly
            old = lp.detach()
        adv = clip_advantages(batch.advantages.double(), o.adv_clip)
        if o.advantage_max is not None:
            adv = adv / o.adv_clip * o.advantage_max
        policy_loss, m = clipped_surrogate(lp - old, adv, o.clip_range)
        loss = policy_loss
        metrics: dict[str, Any] = {
            "awm/policy_loss": policy_loss.detach().mean(),
            "awm/log_p": lp.detach().mean(),
            "awm/fm_error": ((v.detach().double() - target) ** 2).mean(dim=dims).mean(),
            "awm/t": t.detach().float().mean(),
            "awm/ratio": m["ratio"],
            "awm/clipfrac": m["clipfrac"],
            "awm/approx_kl": m["approx_kl"],
        }
        if o.kl_beta > 0:
            with policy.reference():
                v_ref = policy.velocity(x_t, t, batch.cond)
            kl = self._kl(v, v_ref, t64, o.kl_weight, dims)
            loss = loss + o.kl_beta * kl
            metrics["awm/kl"] = kl.detach().mean()
        if v_ema is not None:
            kl_ema = self._kl(v, v_ema, t64, o.ema_kl_weight, dims)
            loss = loss + o.ema_kl_beta * kl_ema
            metrics["awm/ema_kl"] = kl_ema.detach().mean()
        return LossOutput(loss=loss.float(), metrics=metrics)

    @staticmethod
    def _kl(v: torch.Tensor, v_other: torch.Tensor, t: torch.Tensor, weight: str, dims: tuple[int, ...]) -> torch.Tensor:
        """mean over latent dims of (v - v_other)^2, divided by 2 std_t^2 for the `elbo` weighting; [B]."""
        kl = ((v.double() - v_other.detach().double()) ** 2).mean(dim=dims)
        if weight == "elbo":
            kl = kl / (2 * elbo_std(t) ** 2)
        return kl
