"""Flow-DPPO's objective: PPO's ratio clip replaced by a per-step Gaussian-KL trust-region mask.

Flow-DPPO ("Divergence Proximal Policy Optimization for flow matching models", arXiv 2606.11025; public
implementations: UniRL `FlowDPPO`, verl-omni loss mode `flow_dppo`). For a rollout with advantage A and a
stochastic step t of its SDE trajectory, with l_old the log-prob stored at sampling time:

    r_t  = exp(l_theta(x_{t+1} | x_t) - l_old)
    D_t  = mean over latent dims of (mu_theta - mu_old)^2 / (2 s_t^2)      (`kl_normalization: none`: / 2)
    drop = D_t >= tau  and  ((r_t > 1 and A > 0) or (r_t < 1 and A < 0))
    L_t  = 0 if drop else -A r_t                                             (+ kl_beta KL_ref, as grpo)

Both step Gaussians share the step's std s_t (it does not depend on the policy), so D_t is their exact KL,
averaged over latent dims like the log-probs. The mask removes only updates that are both outside the trust
region and still moving away from the sampling policy; corrective moves stay. mu_old is the sampling policy's
step mean: on a fresh batch (the first optimizer step of an epoch) it is the current mean, detached (D_t = 0);
afterwards it is recomputed under no grad with a snapshot of the trainable parameters taken by `on_rollout`,
swapped in before the forward with grad (the references replay the old means at pre-update weights the same way).
"""

from __future__ import annotations

from typing import Any

import torch

from flowfactory.algorithms import ParamSnapshot, approx_kl
from flowfactory.errors import FlowFactoryError
from flowfactory.train.state import named_trainable
from flowfactory.types import LossOutput, OptimizerHooks, Policy, Requirements, Sampler, TrainBatch


def dppo_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, mean: torch.Tensor,
                     old_mean: torch.Tensor, std: torch.Tensor | float, advantages: torch.Tensor,
                     threshold: float, normalization: str = "step") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The masked policy loss [B] of one step, and its per-sample diagnostics (`ratio`, `kl`, `outside`, `drop`).

    log_prob, old_log_prob, advantages: [B]; mean, old_mean: [B, *latent]; std: the step's std (a scalar)."""
    ratio = torch.exp(log_prob - old_log_prob)
    dims = tuple(range(1, mean.ndim))
    sq = ((mean.float() - old_mean.detach().float()) ** 2).mean(dim=dims)
    var = torch.as_tensor(std, dtype=torch.float32, device=sq.device) ** 2 if normalization == "step" else 1.0
    kl = (sq / (2 * var)).detach()
    adv = advantages.detach().float()
    outside = kl >= threshold
    drop = outside & (((ratio > 1) & (adv > 0)) | ((ratio < 1) & (adv < 0)))
    loss = torch.where(drop, torch.zeros((), dtype=ratio.dtype, device=ratio.device), -adv * ratio)
    return loss, {"ratio": ratio.detach(), "kl": kl, "outside": outside, "drop": drop}


class DPPO(OptimizerHooks):
    """The `dppo` policy optimizer (see the module docstring for the objective)."""

    def __init__(self, options: Any):
        self.options = options
        self.requirements = Requirements(keep="steps", stochastic=True, reference=options.kl_beta > 0)
        self._old: ParamSnapshot | None = None  # the sampling policy's trainable parameters, taken in on_rollout

    def units(self, batch: TrainBatch) -> list[int]:
        return batch.trajectory.stochastic_steps()

    def on_rollout(self, policy: Policy) -> None:
        """Keep the sampling policy's parameters, to recompute its step means after the first optimizer step."""
        self._old = ParamSnapshot.retake(self._old, named_trainable(policy))

    def _old_mean(self, policy: Policy, sampler: Sampler, batch: TrainBatch, unit: int) -> torch.Tensor | None:
        """The sampling policy's step mean on a non-fresh batch (None on a fresh one: the current mean is it).
        Runs before the forward with grad: the swap writes the parameters in place."""
        if batch.fresh:
            return None
        if self._old is None:
            raise FlowFactoryError("optimizer `dppo` got an update after a rollout without its on_rollout snapshot "
                                   "of the sampling policy; call on_rollout(policy) after rollouts")
        traj = batch.trajectory
        with torch.no_grad(), self._old.swapped(named_trainable(policy)):
            dist = sampler.step_distribution(policy, traj.latents[:, unit], traj.sigmas, unit, batch.cond,
                                             stochastic=True)
        return dist.mean.float()

    def loss(self, policy: Policy, sampler: Sampler, batch: TrainBatch, unit: int) -> LossOutput:
        o = self.options
        traj = batch.trajectory
        old_mean = self._old_mean(policy, sampler, batch, unit)
        dist = sampler.log_prob(policy, traj, unit, batch.cond)
        old_lp = traj.log_probs[:, unit].float()
        mu_old = dist.mean.detach().float() if old_mean is None else old_mean
        loss, d = dppo_policy_loss(dist.log_prob, old_lp, dist.mean, mu_old, dist.std, batch.advantages,
                                   o.kl_threshold, o.kl_normalization)
        log_ratio = (dist.log_prob - old_lp).detach()
        metrics: dict[str, Any] = {
            "dppo/policy_loss": loss.detach().mean(),
            "dppo/kl": d["kl"].mean(),
            "dppo/outside_frac": d["outside"].float().mean(),
            "dppo/masked_frac": d["drop"].float().mean(),
            "dppo/ratio": d["ratio"].mean(),
            "dppo/approx_kl": approx_kl(log_ratio),
        }
        max_metrics: dict[str, Any] = {"dppo/kl_max": d["kl"].max()}
        if o.kl_beta > 0:
            with policy.reference():
                ref = sampler.step_distribution(policy, traj.latents[:, unit], traj.sigmas, unit, batch.cond,
                                                stochastic=True)
            dims = tuple(range(1, dist.mean.ndim))
            kl_ref = ((dist.mean.float() - ref.mean.detach().float()) ** 2).mean(dim=dims) / (2 * dist.std**2)
            loss = loss + o.kl_beta * kl_ref
            metrics["dppo/kl_ref"] = kl_ref.detach().mean()
        if batch.fresh:
            max_metrics["logprob/agreement"] = log_ratio.abs().max()
        return LossOutput(loss=loss, metrics=metrics, max_metrics=max_metrics)
