"""End-to-end online Diffusion-DPO on the toy policy: the reward rises, a resumed run equals an uninterrupted one,
and the update does not depend on the micro-batch size or the process count (pairs draw from their rows' keys)."""

from __future__ import annotations

import math

import pytest
import torch
from runs import free_port, rows, train, weights
from test_parallel import FSDP, assert_same_run, torchrun

DPO = {"name": "dpo", "options": {"num_times": 2, "beta": 100.0}}
DPO_ALL = {"name": "dpo", "options": {"num_times": 2, "beta": 100.0, "pairs": "all", "min_gap": 0.01}}
ODE = {"name": "ode", "options": {"steps": 6}}
QUIET = {"eval_every": 0, "sample_every": 0, "checkpoint_every": 0}


def test_dpo_reward_rises(toy_registry, toy_config, tmp_path):
    summary = train(toy_config(optimizer=DPO, sampler=ODE, train={**QUIET, "epochs": 12}), tmp_path / "run")
    log = rows(tmp_path / "run")
    assert [r["epoch"] for r in log] == list(range(1, 13))
    assert summary.reward_last > summary.reward_first + 0.1, (summary.reward_first, summary.reward_last)
    assert {"dpo/loss", "dpo/implicit_acc", "dpo/margin", "dpo/model_mse", "dpo/ref_mse", "dpo/pairs"} <= set(log[-1])
    assert log[0]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts at the reference
    assert log[-1]["dpo/implicit_acc"] > 0.5 and log[-1]["dpo/pairs"] == 1.0  # a micro-batch of 8 = one group


def test_dpo_resume_equals_uninterrupted(toy_registry, toy_config, tmp_path):
    path = toy_config(optimizer=DPO_ALL, sampler=ODE,
                      train={**QUIET, "epochs": 6, "steps_per_epoch": 2, "checkpoint_every": 2})
    train(path, tmp_path / "full")
    train(path, tmp_path / "part", ["train.epochs=3"])
    summary = train(path, tmp_path / "part", resume=True)
    assert summary.resumed_from == 3  # the run's last epoch is always checkpointed
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["reward/mean"] for r in rows(tmp_path / "full")] == [r["reward/mean"] for r in rows(tmp_path / "part")]


def test_dpo_update_does_not_depend_on_the_micro_batch_size(toy_registry, toy_config, tmp_path):
    for mb in (16, 8):
        train(toy_config(optimizer=DPO_ALL, sampler=ODE, train={**QUIET, "epochs": 3, "micro_batch_size": mb}),
              tmp_path / f"mb{mb}")
    a, b = weights(tmp_path / "mb16"), weights(tmp_path / "mb8")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_dpo_two_fsdp_processes_equal_one_process(toy_registry, toy_config, tmp_path):
    """Each process holds one group of 8 (every pair with a gap, so up to 28 pairs per unit)."""
    path = toy_config(optimizer=DPO_ALL, sampler=ODE, train={**QUIET, "epochs": 3, **FSDP})
    train(path, tmp_path / "one")
    torchrun(path, tmp_path / "two", port=free_port())
    assert_same_run(tmp_path / "one", tmp_path / "two", 1e-5)
