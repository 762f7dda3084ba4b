"""Supervised fine-tuning (SFT) for flow matching: the rectified-flow training loss on a dataset's target images.

Each row is a prompt record's `target` image, encoded to clean latents x0 by the policy (the loop's dataset
source: nothing is sampled). At a noise level t with Gaussian eps:

    x_t = (1 - t) x0 + t eps,      L = mean over latent dims of (v_theta(x_t, t) - (eps - x0))^2

the conditional flow-matching objective of Lipman et al. 2023 / Liu et al. 2023 in the convention of the
policies here (v ~ noise - data), which is how FLUX, SD3, Qwen-Image and Wan were pre-trained. Each of the K units
draws its own (t, eps) per row, from a generator seeded by the run seed and the row's key, so any micro-batch size
or process count gives the same update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flowfactory.algorithms import stratified_times
from flowfactory.seeding import randn_per_sample, sample_seed
from flowfactory.types import LossOutput, OptimizerHooks, Policy, Requirements, Sampler, TrainBatch

_STREAM = 0x534654  # "SFT": keeps this optimizer's seeds apart from the loop's and other algorithms'


@dataclass
class SFTUnit:
    """The k-th noise level of every row of a micro-batch: times [B] float32 and each row's noise seed."""

    index: int
    times: torch.Tensor
    noise_seeds: tuple[int, ...]


def flow_matching_error(v: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """[B] float64: mean over latent dims of (v - (eps - x0))^2."""
    dims = tuple(range(1, x0.ndim))
    return ((v.double() - (eps.double() - x0.double())) ** 2).mean(dim=dims)


class SFT(OptimizerHooks):
    """The `sft` policy optimizer: learns from the records' `target` images; needs no sampler log-probabilities
    and no reference policy."""

    def __init__(self, options: Any, seed: int = 0):
        self.options = options
        self.seed = int(seed)
        self.requirements = Requirements(keep="final", stochastic=False, reference=False, source="dataset",
                                         targets=("target",))

    def units(self, batch: TrainBatch) -> list[SFTUnit]:
        o = self.options
        keys = [(self.seed, _STREAM, *k) for k in batch.row_keys()]
        times = [stratified_times(o.num_times, torch.Generator().manual_seed(sample_seed(*key, 0)), o.time_min, o.time_max,
                           o.time_shift) for key in keys]
        return [SFTUnit(index=k, times=torch.stack([t[k] for t in times]),
                        noise_seeds=tuple(sample_seed(*key, k + 1) for key in keys)) for k in range(o.num_times)]

    def loss(self, policy: Policy, sampler: Sampler, batch: TrainBatch, unit: SFTUnit) -> LossOutput:
        x0 = batch.trajectory.final
        eps = randn_per_sample(tuple(x0.shape[1:]), [torch.Generator().manual_seed(s) for s in unit.noise_seeds],
                               device=x0.device, dtype=x0.dtype)
        t = unit.times.to(x0.device)
        tb = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        v = policy.velocity((1 - tb) * x0 + tb * eps, t, batch.cond)
        err = flow_matching_error(v, x0, eps)
        return LossOutput(loss=err.float(), metrics={"sft/mse": err.detach().mean(), "sft/t": t.float().mean()})
