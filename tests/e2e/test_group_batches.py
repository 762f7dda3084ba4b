"""Batches that know their groups: every micro-batch carries its rows' group ids and rewards, and an algorithm
that asks for whole groups gets them (groups shuffled, never split), on every micro-batch size that allows it."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from runs import rows, train

from flowfactory.config import load
from flowfactory.errors import ConfigError
from flowfactory.registry import ComponentSpec, NoOptions
from flowfactory.types import LossOutput, OptimizerHooks, Requirements


class GroupRecorder(OptimizerHooks):
    """REINFORCE on the stored log-probs that keeps every micro-batch it is given."""

    def __init__(self, whole_groups: bool):
        self.requirements = Requirements(keep="steps", stochastic=True, reference=False, whole_groups=whole_groups)
        self.batches = []

    def setup(self, policy, sampler):
        return None

    def units(self, batch):
        return batch.trajectory.stochastic_steps()[:1]

    def loss(self, policy, sampler, batch, unit):
        if unit == batch.trajectory.stochastic_steps()[0]:
            self.batches.append(batch)
        lp = sampler.log_prob(policy, batch.trajectory, unit, batch.cond).log_prob
        return LossOutput(loss=-batch.advantages * lp)


def _register(registry, algo):
    registry._specs["optimizer"]["recorder"] = ComponentSpec("optimizer", "recorder", lambda o, c: algo, NoOptions,
                                                             "recorder", "tests", "0")


RUN = {"epochs": 2, "prompts_per_epoch": 4, "group_size": 4, "eval_every": 0, "sample_every": 0,
       "checkpoint_every": 0}


@pytest.mark.parametrize("micro_batch_size, steps", [(4, 1), (8, 2), (16, 1)])
def test_whole_groups_per_micro_batch_with_their_rewards(toy_registry, toy_config, tmp_path, micro_batch_size, steps):
    algo = GroupRecorder(whole_groups=True)
    _register(toy_registry, algo)
    train(toy_config(optimizer={"name": "recorder", "options": {}}, train={**RUN, "micro_batch_size": micro_batch_size,
                                                             "steps_per_epoch": steps}), tmp_path / "run")
    log = rows(tmp_path / "run")
    for epoch in (1, 2):
        batches = [b for b in algo.batches if b.sample_keys[0][0] == epoch]
        assert sum(len(b.advantages) for b in batches) == 16
        for b in batches:
            counts = Counter(b.group_ids.tolist())
            assert set(counts.values()) == {4}, counts  # whole groups only
            assert [b.group_ids[i:i + 4].unique().numel() for i in range(0, len(b.group_ids), 4)] == \
                [1] * (len(b.group_ids) // 4)  # each group's rows together
            # the rows' keys are their global sample indexes, and a group is 4 consecutive samples
            for key, g in zip(b.row_keys(), b.group_ids.tolist()):
                assert key[2] // 4 == g
            assert b.pass_key() == (epoch, 0)
            groups = b.groups()
            assert all(len(rows_) == 4 for rows_ in groups)
        # the rewards carried are the epoch's rewards: their mean is the logged mean
        allr = torch.cat([b.rewards for b in batches]).cpu()
        assert float(allr.mean()) == pytest.approx(log[epoch - 1]["reward/mean"], abs=1e-6)
    # the groups are shuffled: over the two epochs, they do not always come in order 0, 1, 2, 3
    orders = [[int(g) for g in torch.cat([b.group_ids for b in algo.batches if b.sample_keys[0][0] == e])[::4]]
              for e in (1, 2)]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders) and orders != [[0, 1, 2, 3]] * 2


def test_rows_are_shuffled_across_groups_without_the_requirement(toy_registry, toy_config, tmp_path):
    algo = GroupRecorder(whole_groups=False)
    _register(toy_registry, algo)
    train(toy_config(optimizer={"name": "recorder", "options": {}}, train={**RUN, "micro_batch_size": 4}), tmp_path / "run")
    assert any(len(set(b.group_ids.tolist())) > 1 for b in algo.batches)
    assert all(b.group_ids is not None and b.rewards is not None for b in algo.batches)


def test_a_micro_batch_that_would_split_a_group_is_a_config_error(toy_registry, toy_config):
    _register(toy_registry, GroupRecorder(whole_groups=True))
    with pytest.raises(ConfigError, match=r"train.micro_batch_size: optimizer 'recorder' compares rollouts within a "
                                          r"group, so each micro-batch holds whole groups: use a multiple of "
                                          r"train.group_size = 4"):
        load(toy_config(optimizer={"name": "recorder", "options": {}}, train={**RUN, "micro_batch_size": 6}))
