"""DiffusionNFT's objective (Zheng et al. 2025, arXiv 2509.16117; NVlabs/DiffusionNFT scripts/train_nft_sd3.py).

Rollouts are deterministic (ODE) samples of the *old* policy, an EMA of the trained weights; only their final
latents x0 are kept. For a rollout with advantage A, at a training time t with fresh noise eps:
    x_t  = (1 - t) x0 + t eps                         (the forward process; the target velocity is eps - x0)
    v+   = (1 - beta) v_old + beta v_theta            (implicit positive policy)
    v-   = (1 + beta) v_old - beta v_theta            (implicit negative policy)
    x0±  = x_t - t v±                                 (their data predictions)
    L±   = mean_dims (x0± - x0)^2 / sg(max(mean_dims |x0± - x0|, 1e-5))     (adaptive weighting)
    r    = 0.5 + 0.5 clip(A, -c, c) / c               (optimality probability, in [0, 1])
    loss = c / beta * (r L+ + (1 - r) L-)  +  kl_beta * mean_dims (v_theta - v_ref)^2
Since x0± - x0 = t (v* - v±), L± = t mean (v± - v*)^2 / mean |v± - v*| with v* = eps - x0 (when above the floor).
v_old is computed under no grad with the EMA weights swapped in. Each of the K training times of a
micro-batch is one work unit (its own forward/backward). The old policy follows the reference's schedule:
after the epoch's last optimizer step, old <- d old + (1 - d) theta with d = min(max(step - flat, 0) * rate, max)
(0 before `flat`), `step` the optimizer steps taken so far.

Randomness (training times, forward noise) is drawn per rollout from generators seeded by (run seed, option
seed, the row's `TrainBatch` key: epoch, inner epoch, global sample index), so a rollout draws the same
times and noise whatever its micro-batch, process or process count, and a resumed run draws what an
uninterrupted one does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from flowfactory.algorithms import clip_advantages, shift_times
from flowfactory.errors import FlowFactoryError
from flowfactory.seeding import randn_per_sample, sample_seed
from flowfactory.train.ema import EMA
from flowfactory.train.state import named_trainable
from flowfactory.types import LossOutput, OptimizerHooks, Policy, Requirements, Sampler, TrainBatch


@dataclass(frozen=True)
class NFTUnit:
    """One training time per rollout of a micro-batch: one forward/backward of the loop."""

    index: int  # k in 0..K-1
    times: torch.Tensor  # [B] float32 training times t in [0, 1]
    seeds: tuple[int, ...]  # per row: the seed of this unit's forward-process noise eps


def old_decay(step: int, flat: int, rate: float, ceiling: float) -> float:
    """The reference's old-policy EMA decay after `step` optimizer steps (`return_decay`)."""
    if step < flat:
        return 0.0
    return min((step - flat) * rate, ceiling)


def optimality(advantages: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """r = 0.5 + 0.5 clip(A, -c, c) / c in [0, 1]: the probability that a rollout is "positive"."""
    a = clip_advantages(advantages.float(), adv_clip)
    return (a / adv_clip / 2.0 + 0.5).clamp(0.0, 1.0)


def draw_times(options: Any, n: int, k: int, sigmas: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[n, k] float32 training times per rollout, drawn with `generator` as `options` say, then shifted.

    `discrete` takes, per rollout, distinct grid points in random order (a fresh permutation for every pass
    when k exceeds the grid): the schedule's sigmas without the final 0, or k evenly spaced points."""
    o = options
    if o.time_sampling == "uniform":
        t = torch.rand(n, k, generator=generator, dtype=torch.float64)
    elif o.time_sampling == "logit-normal":
        t = torch.sigmoid(o.logit_mean + o.logit_std * torch.randn(n, k, generator=generator, dtype=torch.float64))
    else:
        if o.discrete_grid == "schedule":
            grid = sigmas.detach().cpu().double()[:-1]
        else:
            grid = 1.0 - torch.arange(k, dtype=torch.float64) / k
        m = len(grid)
        passes = math.ceil(k / m)
        idx = torch.stack([torch.cat([torch.randperm(m, generator=generator) for _ in range(passes)])[:k]
                           for _ in range(n)])
        t = grid[idx]
    return shift_times(t, o.time_shift).float()


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
             advantages: torch.Tensor, beta: float, adv_clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample [B] DiffusionNFT policy loss (no KL) and its parts, in float32 (see the module docstring)."""
    dims = tuple(range(1, x0.ndim))
    tb = t.float().view(-1, *([1] * (x0.ndim - 1)))
    v_old = v_old.detach().float()
    v_theta = v_theta.float()
    v_pos = beta * v_theta + (1.0 - beta) * v_old
    v_neg = (1.0 + beta) * v_old - beta * v_theta

    def weighted(v: torch.Tensor) -> torch.Tensor:
        err = xt.float() - tb * v - x0.float()  # x0 prediction minus x0
        with torch.no_grad():
            w = err.detach().double().abs().mean(dim=dims, keepdim=True).clamp(min=1e-5).float()
        return (err**2 / w).mean(dim=dims)

    pos, neg = weighted(v_pos), weighted(v_neg)
    r = optimality(advantages, adv_clip).to(pos.device)
    loss = (r * pos + (1.0 - r) * neg) / beta * adv_clip
    return loss, {"positive": pos, "negative": neg, "r": r}


class NFT(OptimizerHooks):
    """The `nft` policy optimizer (see the module docstring for the objective)."""

    def __init__(self, options: Any, seed: int = 0):
        self.options = options
        self.requirements = Requirements(keep="final", stochastic=False, reference=options.kl_beta > 0)
        self.seed = seed
        self.steps = 0  # optimizer steps taken (drives the decay schedule)
        self.last_decay = 0.0
        self._ema: EMA | None = None

    # --- the old (sampling) policy ----------------------------------------------------------------------
    def _old(self, params: dict[str, torch.Tensor]) -> EMA:
        """The old policy's EMA, created from the named trainable parameters on first use."""
        if self._ema is None:
            self._ema = EMA(params, 0.0)
        return self._ema

    def _move_old(self, params: dict[str, torch.Tensor]) -> None:
        """old <- d old + (1 - d) theta with the scheduled decay d."""
        o = self.options
        ema = self._old(params)
        ema.decay = old_decay(self.steps, o.old_decay_flat, o.old_decay_rate, o.old_decay_max)
        ema.update(params)
        self.last_decay = ema.decay

    def setup(self, policy: Policy, sampler: Sampler) -> None:
        """Any sampler serves (rollouts are deterministic); creates the old policy from the current weights."""
        super().setup(policy, sampler)
        self._old(named_trainable(policy))

    @contextmanager
    def sampling(self, policy: Policy) -> Iterator[None]:
        """Roll out with the old policy's weights; the trained weights come back after."""
        params = named_trainable(policy)
        with self._old(params).swapped(params):
            yield

    def on_step(self, policy: Policy) -> None:
        """Count the step; move the old policy now with `old_update: step`."""
        self.steps += 1
        if self.options.old_update == "step":
            self._move_old(named_trainable(policy))

    def on_epoch_end(self, policy: Policy) -> None:
        """Move the old policy once per epoch with `old_update: epoch`, as the reference does."""
        if self.options.old_update == "epoch":
            self._move_old(named_trainable(policy))

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "last_decay": self.last_decay,
                "ema": self._ema.state_dict() if self._ema is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's state; `setup` comes first (it creates the old policy this fills)."""
        if not state:
            return
        self.steps, self.last_decay = int(state["steps"]), float(state["last_decay"])
        if state.get("ema") is not None:
            if self._ema is None:
                raise FlowFactoryError("optimizer `nft`: load_state_dict(state) needs setup(policy, sampler) first, "
                                       "which creates the old policy the state fills (the loop calls them in that order)")
            self._ema.load_state_dict(state["ema"])

    # --- the loss ---------------------------------------------------------------------------------------
    def units(self, batch: TrainBatch) -> list[NFTUnit]:
        """K training times per rollout of this micro-batch, each rollout's drawn from its own key."""
        traj = batch.trajectory
        k = self.options.num_times or (len(traj.sigmas) - 1)
        keys = [(self.seed, self.options.seed, *key) for key in batch.row_keys()]
        times = torch.cat([draw_times(self.options, 1, k, traj.sigmas,
                                      torch.Generator().manual_seed(sample_seed(*key, 0))) for key in keys])
        return [NFTUnit(index=j, times=times[:, j].contiguous(), seeds=tuple(sample_seed(*key, 1, j) for key in keys))
                for j in range(k)]

    def loss(self, policy: Policy, sampler: Sampler, batch: TrainBatch, unit: NFTUnit) -> LossOutput:
        o = self.options
        params = named_trainable(policy)
        final = batch.trajectory.final
        x0 = final.float()
        eps = randn_per_sample(tuple(x0.shape[1:]), [torch.Generator().manual_seed(s) for s in unit.seeds],
                               device=x0.device)
        t = unit.times.to(x0.device, torch.float32)
        tb = t.view(-1, *([1] * (x0.ndim - 1)))
        xt = (1.0 - tb) * x0 + tb * eps
        x_in = xt.to(final.dtype)
        with torch.no_grad(), self._old(params).swapped(params):
            v_old = policy.velocity(x_in, t, batch.cond).float()
        v = policy.velocity(x_in, t, batch.cond).float()
        loss, parts = nft_loss(v, v_old, x0, xt, t, batch.advantages, o.beta, o.adv_clip)
        dims = tuple(range(1, x0.ndim))
        metrics: dict[str, Any] = {
            "nft/policy_loss": loss.detach().mean(),
            "nft/positive_loss": parts["positive"].detach().mean(),
            "nft/negative_loss": parts["negative"].detach().mean(),
            "nft/r": parts["r"].mean(),
            "nft/old_deviate": ((v.detach() - v_old) ** 2).mean(),
            "nft/t": t.mean(),
            "nft/old_decay": torch.tensor(self.last_decay),
        }
        if o.kl_beta > 0:
            with policy.reference():
                v_ref = policy.velocity(x_in, t, batch.cond).float()
            kl = ((v - v_ref.detach()) ** 2).mean(dim=dims)
            loss = loss + o.kl_beta * kl
            metrics["nft/kl"] = kl.detach().mean()
        return LossOutput(loss=loss, metrics=metrics)
