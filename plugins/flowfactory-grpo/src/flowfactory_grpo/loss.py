"""Flow-GRPO's objective.

For a rollout with advantage A and a stochastic step t with stored log-prob l_old:
    r = exp(l_new - l_old)
    loss = max(-A r, -A clip(r, 1 - c, 1 + c))  +  beta * KL_t
    KL_t = mean over latent dims of (mu_theta - mu_ref)^2 / (2 std_t^2)     (both Gaussians share std_t)
Each stochastic step is its own forward/backward (one update unit per trained timestep).
"""

from __future__ import annotations

import torch

from flowfactory.errors import FlowFactoryError
from flowfactory.types import LossOutput, Policy, Requirements, Sampler, TrainBatch


class GRPO:
    requirements = Requirements(keep="steps", stochastic=True)

    def __init__(self, options):
        self.options = options

    def setup(self, policy: Policy, sampler: Sampler) -> None:
        if not getattr(sampler, "stochastic", True):
            raise FlowFactoryError(
                "optimizer `grpo` needs a stochastic sampler with log-probabilities, but the configured sampler "
                "is deterministic. Set `sampler.name` to an SDE sampler such as `flow-sde`.")

    def units(self, batch: TrainBatch) -> list[int]:
        return batch.trajectory.stochastic_steps()

    def loss(self, policy: Policy, sampler: Sampler, batch: TrainBatch, unit: int) -> LossOutput:
        o = self.options
        traj = batch.trajectory
        dist = sampler.log_prob(policy, traj, unit, batch.cond)
        old = traj.log_probs[:, unit].float()
        adv = batch.advantages.float().clamp(-o.adv_clip, o.adv_clip)
        log_ratio = dist.log_prob - old
        ratio = torch.exp(log_ratio)
        unclipped = -adv * ratio
        clipped = -adv * torch.clamp(ratio, 1.0 - o.clip_range, 1.0 + o.clip_range)
        loss = torch.maximum(unclipped, clipped)
        metrics = {
            "grpo/policy_loss": loss.detach().mean(),
            "grpo/clipfrac": ((ratio - 1.0).abs() > o.clip_range).float().mean().detach(),
            "grpo/approx_kl": (0.5 * log_ratio.detach() ** 2).mean(),
        }
        if o.kl_beta > 0:
            x = traj.latents[:, unit]
            with policy.reference():
                ref = sampler.step_distribution(policy, x, traj.sigmas, unit, batch.cond, stochastic=True)
            dims = tuple(range(1, dist.mean.ndim))
            kl = ((dist.mean - ref.mean.detach()) ** 2).mean(dim=dims) / (2 * dist.std**2)
            loss = loss + o.kl_beta * kl
            metrics["grpo/kl"] = kl.detach().mean()
        max_metrics = {}
        if batch.fresh:
            max_metrics["logprob/agreement"] = log_ratio.detach().abs().max()
        return LossOutput(loss=loss, metrics=metrics, max_metrics=max_metrics)
