"""Flow-GRPO's objective, optionally with GRPO-Guard's regulated clipping.

For a rollout with advantage A and a stochastic step t with stored log-prob l_old:
    r = exp(l_new - l_old)
    loss = max(-A r, -A clip(r, 1 - c, 1 + c))  +  beta * KL_t
    KL_t = mean over latent dims of (mu_theta - mu_ref)^2 / (2 s^2)     (both Gaussians share the step's std s)
with s^2 = std_t^2 |dt| the step's variance (`kl_normalization: step`, the Gaussian KL), or std_t^2 alone
(`kl_normalization: flow-grpo`, as Flow-GRPO's code: 1/|dt| times weaker, so its kl_beta values carry over).
Each stochastic step is its own forward/backward (one update unit per trained timestep).

GRPO-Guard (Wang et al. 2025, arXiv 2510.22319), `guard: true`. The step is Gaussian with a std s that does
not depend on the policy, and l is averaged over the D latent dims, so with x' = mu_old + s eps:
    l_new - l_old = mean(eps * d) / s - mean(d^2) / (2 s^2),    d = mu_new - mu_old
The second term is always <= 0 (the ratio's left shift) and both scale with 1/s (the per-timestep spread).
RatioNorm adds the shift back and multiplies by s:
    log r_guard = s * (l_new - l_old + mean(d^2) / (2 s^2)) = mean(eps * d)
which is centred on 0 at every timestep, and the clipped loss uses r_guard. Gradient reweighting multiplies
the policy term by 1 / |dt| (`guard_reweight`), since d, hence the gradient, scales with the step's |dt|.
mu_old is the sampling policy's mean: on a fresh batch it is the current mean (detached); afterwards it is
recomputed under no grad with a snapshot of the trainable parameters taken by `on_rollout` after each rollout.
"""

from __future__ import annotations

from typing import Any

import torch

from flowfactory.algorithms import ParamSnapshot, clip_advantages, clipped_surrogate
from flowfactory.errors import FlowFactoryError
from flowfactory.types import LossOutput, OptimizerHooks, Policy, Requirements, Sampler, TrainBatch


class GRPO(OptimizerHooks):
    """The `grpo` policy optimizer (see the module docstring for the objective)."""

    def __init__(self, options: Any):
        self.options = options
        # the reference view is used only by the KL term; without it a full finetune needs no frozen copy
        self.requirements = Requirements(keep="steps", stochastic=True, reference=options.kl_beta > 0)
        self._old: ParamSnapshot | None = None  # GRPO-Guard: the sampling policy's parameters

    def check_sampler(self, sampler: Sampler) -> str | None:
        """GRPO-Guard's derivation holds for Flow-GRPO's SDE step only: it needs a sampler whose `sde_type` is
        `flow-sde` (the base class has already required a stochastic one)."""
        if self.options.guard and getattr(sampler, "sde_type", None) != "flow-sde":
            return ("`guard: true` (GRPO-Guard) normalises the importance ratio of Flow-GRPO's SDE step and "
                    "needs the `flow-sde` sampler; set `sampler.name: flow-sde` or `optimizer.options.guard: false`")
        return None

    def units(self, batch: TrainBatch) -> list[int]:
        return batch.trajectory.stochastic_steps()

    def on_rollout(self, policy: Policy) -> None:
        """GRPO-Guard: keep the sampling policy's parameters, to recompute its step means after updates."""
        if self.options.guard:
            self._old = ParamSnapshot.retake(self._old, policy.trainable_parameters())

    def _old_mean(self, policy: Policy, sampler: Sampler, batch: TrainBatch, unit: int) -> torch.Tensor | None:
        """The sampling policy's step mean for a non-fresh batch (None for a fresh one: the current mean is it).

        Must run before the forward with grad: it swaps the snapshot into the parameters in place."""
        if batch.fresh:
            return None
        if self._old is None:
            raise FlowFactoryError("optimizer `grpo` with `guard: true` got an update after a rollout without its "
                                   "on_rollout snapshot of the sampling policy; call on_rollout(policy) after rollouts")
        traj = batch.trajectory
        with torch.no_grad(), self._old.swapped(policy.trainable_parameters()):
            dist = sampler.step_distribution(policy, traj.latents[:, unit], traj.sigmas, unit, batch.cond,
                                             stochastic=True)
        return dist.mean.float()

    def loss(self, policy: Policy, sampler: Sampler, batch: TrainBatch, unit: int) -> LossOutput:
        o = self.options
        traj = batch.trajectory
        old_mean = self._old_mean(policy, sampler, batch, unit) if o.guard else None
        dist = sampler.log_prob(policy, traj, unit, batch.cond)
        old = traj.log_probs[:, unit].float()
        adv = clip_advantages(batch.advantages.float(), o.adv_clip)
        log_ratio = dist.log_prob - old
        metrics: dict[str, Any] = {}
        weight = 1.0
        if o.guard:
            s = dist.std.float()
            mu_old = dist.mean.detach().float() if old_mean is None else old_mean
            dims = tuple(range(1, dist.mean.ndim))
            shift = ((dist.mean.float() - mu_old) ** 2).mean(dim=dims) / (2 * s**2)
            clip_log_ratio = s * (log_ratio + shift)  # RatioNorm
            if o.guard_reweight:
                weight = 1.0 / abs(float(traj.sigmas[unit + 1]) - float(traj.sigmas[unit]))
            metrics["grpo/guard_shift"] = shift.detach().mean()
            metrics["grpo/guard_log_ratio"] = clip_log_ratio.detach().mean()
            metrics["grpo/guard_weight"] = torch.tensor(weight)
        else:
            clip_log_ratio = log_ratio
        surrogate, m = clipped_surrogate(clip_log_ratio, adv, o.clip_range, kl_log_ratio=log_ratio)
        loss = weight * surrogate
        metrics.update({
            "grpo/policy_loss": loss.detach().mean(),
            "grpo/clipfrac": m["clipfrac"],
            "grpo/approx_kl": m["approx_kl"],
        })
        if o.kl_beta > 0:
            x = traj.latents[:, unit]
            with policy.reference():
                ref = sampler.step_distribution(policy, x, traj.sigmas, unit, batch.cond, stochastic=True)
            dims = tuple(range(1, dist.mean.ndim))
            var = dist.std**2  # the step's variance std_t^2 |dt|
            if o.kl_normalization == "flow-grpo":  # Flow-GRPO divides by std_t^2 alone
                var = var / abs(float(traj.sigmas[unit + 1]) - float(traj.sigmas[unit]))
            kl = ((dist.mean - ref.mean.detach()) ** 2).mean(dim=dims) / (2 * var)
            loss = loss + o.kl_beta * kl
            metrics["grpo/kl"] = kl.detach().mean()
        max_metrics = {}
        if batch.fresh:
            max_metrics["logprob/agreement"] = log_ratio.detach().abs().max()
        return LossOutput(loss=loss, metrics=metrics, max_metrics=max_metrics)
