"""flowfactory's optimizer contract suite, run on dpo with both pairings. The suite's batch carries no groups or
rewards; the loop's batches do, so these classes add them (two groups of two, distinct rewards)."""

from __future__ import annotations

import torch

from flowfactory.testing import OptimizerContract
from flowfactory.types import TrainBatch


class _WithGroups(OptimizerContract):
    component = "dpo"
    rows_independent = False  # a row's loss is its group's mean pair loss

    @classmethod
    def make_batch(cls, optimizer, policy, sampler) -> TrainBatch:
        batch = super().make_batch(optimizer, policy, sampler)
        n = len(batch.advantages)
        batch.group_ids = torch.arange(n) // cls.group_size
        batch.rewards = torch.linspace(0.1, 0.9, n).flip(0)
        return batch


class TestDPOContract(_WithGroups):
    options = {"num_times": 2}


class TestDPOAllPairsContract(_WithGroups):
    options = {"num_times": 1, "pairs": "all", "beta": 100.0, "time_shift": 3.0}
    group_size = 3
