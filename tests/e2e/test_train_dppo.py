"""End-to-end Flow-DPPO on the toy policy: the reward rises, a resumed run equals an uninterrupted one, and two
FSDP processes train to the one-process weights."""

from __future__ import annotations

import torch
from runs import free_port, rows, train, weights
from test_parallel import FSDP, assert_same_run, torchrun

from flowfactory.train import checkpoint as ckpt

DPPO = {"name": "dppo", "options": {"kl_threshold": 1e-3}}
QUIET = {"eval_every": 0, "sample_every": 0, "checkpoint_every": 0}


def test_dppo_reward_rises(toy_registry, toy_config, tmp_path):
    # two optimizer steps per epoch: the second is measured against the sampling policy's snapshot
    summary = train(toy_config(optimizer=DPPO, train={**QUIET, "epochs": 12, "steps_per_epoch": 2}), tmp_path / "run")
    log = rows(tmp_path / "run")
    assert [r["epoch"] for r in log] == list(range(1, 13))
    assert summary.reward_last > summary.reward_first + 0.1, (summary.reward_first, summary.reward_last)
    assert {"dppo/policy_loss", "dppo/kl", "dppo/kl_max", "dppo/masked_frac", "logprob/agreement"} <= set(log[-1])
    assert max(r["logprob/agreement"] for r in log) < 1e-4
    assert max(r["dppo/kl_max"] for r in log) > 1e-3  # the second steps leave the trust region ...
    assert 0 < max(r["dppo/masked_frac"] for r in log) < 0.5  # ... and the mask drops some of their moves


def test_dppo_resume_equals_uninterrupted(toy_registry, toy_config, tmp_path):
    path = toy_config(optimizer=DPPO, train={**QUIET, "epochs": 6, "steps_per_epoch": 2, "checkpoint_every": 2})
    train(path, tmp_path / "full")
    train(path, tmp_path / "part", ["train.epochs=3"])
    assert ckpt.read_meta(ckpt.latest(tmp_path / "part" / "checkpoints"))["epoch"] == 3
    summary = train(path, tmp_path / "part", resume=True)
    assert summary.resumed_from == 3
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["reward/mean"] for r in rows(tmp_path / "full")] == [r["reward/mean"] for r in rows(tmp_path / "part")]


def test_dppo_two_fsdp_processes_equal_one_process(toy_registry, toy_config, tmp_path):
    """Two inner epochs, so the second pass swaps the sampling policy's (sharded) snapshot in (several steps per
    epoch would not do: the loop draws each process's rows of a step from its own permutation)."""
    path = toy_config(optimizer=DPPO, train={**QUIET, "epochs": 3, "inner_epochs": 2, "micro_batch_size": 4,
                                             **FSDP})
    train(path, tmp_path / "one")
    torchrun(path, tmp_path / "two", port=free_port())
    assert_same_run(tmp_path / "one", tmp_path / "two", 1e-5)
    assert rows(tmp_path / "two")[-1]["dppo/masked_frac"] == rows(tmp_path / "one")[-1]["dppo/masked_frac"]
