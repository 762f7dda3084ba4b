"""Reward back-propagation (`draft`): the gradient of differentiable rewards through the decode and the last
sampler steps, from the deterministic (ODE) rollout the loop stored.

For a rollout with stored states x_0 (noise) .. x_S (final) on the schedule sigma_0 = 1 > ... > sigma_S = 0,
every variant starts from a stored state (detached, so nothing before it is differentiated), runs some
steps with grad under the current policy, decodes with grad and scores with the run's rewards:

    draft     x = sg(x_{S-K});  x <- step_i(x) for i = S-K .. S-1            (DRaFT-K)
    refl      t ~ U{S-K .. S-1} per sample;  x = sg(x_t) - sigma_t v(sg(x_t), sigma_t)       (ReFL)
    draft-lv  x = step_{S-1}((1 - sigma_{S-1}) sg(x_S) + sigma_{S-1} eps_j),  j = 1 .. n      (DRaFT-LV)

    loss = -sum_k w_k r_k(decode(x), prompt)      per sample; the loop averages over the optimizer step

`step_i` is the sampler's own deterministic step (`step_distribution(..., stochastic=False).mean`), so with
the policy that sampled, DRaFT-K's re-run ends exactly on the stored x_S (logged as `draft/agreement`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from flowfactory.errors import FlowFactoryError
from flowfactory.seeding import generators, randn_per_sample
from flowfactory.train.rewards import score_one
from flowfactory.types import LossOutput, OptimizerHooks, Requirements, Samples, TrainBatch

REFL_SALT, LV_SALT = 1, 2  # separate the two kinds of draws of one row


class Draft(OptimizerHooks):
    """The `draft` policy optimizer (see the module docstring)."""

    requirements = Requirements(keep="steps", stochastic=False, reference=False)

    def __init__(self, options: Any, seed: int = 0):
        self.options = options
        self.seed = seed
        self.rewards: list[tuple[str, Any, float]] | None = None

    # -- the loop's hooks ------------------------------------------------------------------------------------

    def bind_rewards(self, rewards: Any) -> None:
        """Keep the run's rewards; refuse one that cannot be differentiated or that compares within groups."""
        entries = list(rewards.rewards)
        for i, (name, reward, _) in enumerate(entries):
            if not getattr(type(reward), "differentiable", False):
                raise FlowFactoryError(
                    f"rewards[{i}].name: reward {name!r} is not differentiable ({type(reward).__name__} does not "
                    f"set `differentiable = True`), and optimizer `draft` back-propagates every training reward "
                    f"into the policy. Use differentiable rewards (e.g. brightness, colour-match, pickscore, "
                    f"clip-score) or a policy-gradient optimizer such as grpo")
            if getattr(type(reward), "groupwise", False):
                raise FlowFactoryError(
                    f"rewards[{i}].name: reward {name!r} compares the samples of a group, but optimizer `draft` "
                    f"scores micro-batches, which may split groups; use a pointwise reward")
        if not entries:
            raise FlowFactoryError("rewards: optimizer `draft` needs at least one differentiable reward")
        self.rewards = entries

    def check_sampler(self, sampler: Any) -> str | None:
        steps = getattr(sampler, "steps", None)
        if isinstance(steps, int) and self.options.k > steps:
            return f"k={self.options.k} differentiated steps exceed the sampler's {steps} steps; lower k"
        return None

    def units(self, batch: TrainBatch) -> list[int]:
        """One unit per micro-batch; DRaFT-LV: one per re-noised copy."""
        return list(range(self.options.lv_samples)) if self.options.variant == "draft-lv" else [0]

    # -- the loss --------------------------------------------------------------------------------------------

    def loss(self, policy: Any, sampler: Any, batch: TrainBatch, unit: Any) -> LossOutput:
        if self.rewards is None:
            raise FlowFactoryError("optimizer `draft` has no rewards: call bind_rewards(reward_set) first "
                                   "(the training loop does)")
        traj = batch.trajectory
        if traj.latents is None:
            raise ValueError("draft needs the rollout's states: the trajectory must be kept with keep='steps'")
        if batch.prompts is None:
            raise ValueError("draft scores its own decodes and needs TrainBatch.prompts (the loop sets them)")
        variant, k = self.options.variant, self.options.k
        sigmas, steps = traj.sigmas, traj.latents.shape[1] - 1
        if k > steps:
            raise ValueError(f"draft: k={k} exceeds the rollout's {steps} steps")
        max_metrics: dict[str, torch.Tensor] = {}
        if variant == "draft":
            x = traj.latents[:, steps - k].detach()
            for i in range(steps - k, steps):
                x = self._grad_step(lambda z, i=i: sampler.step_distribution(
                    policy, z, sigmas, i, batch.cond, stochastic=False).mean, x)
            if batch.fresh:  # the policy that sampled: the re-run must land on the stored final state
                max_metrics["draft/agreement"] = (x.detach().float() - traj.final.float()).abs().max()
        elif variant == "refl":
            t = self.refl_steps(batch, steps)
            rows = torch.arange(len(t), device=traj.latents.device)
            x_t = traj.latents[rows, t.to(traj.latents.device)].detach()
            sigma = sigmas.to(device=x_t.device, dtype=torch.float32)[t.to(x_t.device)]
            view = (-1,) + (1,) * (x_t.ndim - 1)
            x = self._grad_step(lambda z: z.float() - sigma.view(view) * policy.velocity(z, sigma, batch.cond).float(),
                                x_t)
        else:  # draft-lv
            s = float(sigmas[steps - 1])
            eps = self.lv_noise(batch, int(unit))
            x_in = ((1.0 - s) * traj.final.detach().float() + s * eps).to(traj.final.dtype)
            x = self._grad_step(lambda z: sampler.step_distribution(
                policy, z, sigmas, steps - 1, batch.cond, stochastic=False).mean, x_in)
        images = policy.decode(x)
        if torch.is_grad_enabled() and not images.requires_grad:
            raise FlowFactoryError(f"optimizer `draft`: {type(policy).__name__}.decode returned images detached "
                                   f"from the latents (a @torch.no_grad decode?); it must be differentiable")
        total, per_reward = self.score(images, batch)
        metrics = {"draft/reward": total.detach().mean(),
                   **{f"draft/reward/{name}": v.detach().mean() for name, v in per_reward.items()}}
        return LossOutput(loss=-total, metrics=metrics, max_metrics=max_metrics)

    def score(self, media: torch.Tensor, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the rewards on `media` (images or videos), with the graph, on media's device."""
        assert self.rewards is not None and batch.prompts is not None
        n = media.shape[0]
        groups = [int(g) for g in batch.group_ids.tolist()] if batch.group_ids is not None else list(range(n))
        samples = Samples.of(batch.prompts, group_ids=groups, **{("videos" if media.ndim == 5 else "images"): media})
        total = torch.zeros(n, device=media.device, dtype=torch.float32)
        per: dict[str, torch.Tensor] = {}
        for name, reward, weight in self.rewards:
            s = score_one(reward, samples, name)
            if media.requires_grad and not s.requires_grad:
                raise FlowFactoryError(f"reward {name!r} declares differentiable = True but returned scores "
                                       f"detached from the images")
            s = s.to(media.device)
            per[name] = s
            total = total + weight * s
        return total, per

    # -- keyed draws -----------------------------------------------------------------------------------------

    def _gens(self, batch: TrainBatch, *extra: int) -> list[torch.Generator]:
        return generators(self.seed, [(self.options.seed, *extra, *key) for key in batch.row_keys()])

    def refl_steps(self, batch: TrainBatch, steps: int) -> torch.Tensor:
        """ReFL's step t per row, uniform on {S - k, ..., S - 1}, drawn from the row's key."""
        lo = steps - self.options.k
        return torch.tensor([int(torch.randint(lo, steps, (1,), generator=g)) for g in self._gens(batch, REFL_SALT)],
                            dtype=torch.long)

    def lv_noise(self, batch: TrainBatch, unit: int) -> torch.Tensor:
        """DRaFT-LV's noise for copy `unit` of each row, drawn from the row's key."""
        final = batch.trajectory.final
        return randn_per_sample(tuple(final.shape[1:]), self._gens(batch, LV_SALT, unit), device=final.device)

    def _grad_step(self, fn: Any, x: torch.Tensor) -> torch.Tensor:
        if self.options.checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, x, use_reentrant=False)
        return fn(x)
