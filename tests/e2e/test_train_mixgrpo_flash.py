"""MixGRPO-Flash end to end on the toy policy: the sliding-window MixGRPO run with `ode_solver: dpm-solver++2m`, so
the steps after each epoch's window are DPM-Solver++(2M) steps. The trained steps (the window's) are unchanged: the
log-probabilities recomputed at the first optimizer step equal the rollout's, the reward rises, and a resumed run
equals an uninterrupted one (the multistep history is a function of the rollout so far)."""

from __future__ import annotations

import math

import pytest
from runs import rows, same_weights, train

FLASH = {"name": "flow-sde", "options": {"steps": 6, "sde_window_size": 2, "ode_solver": "dpm-solver++2m",
                                         "sde_window_schedule": {"type": "sliding", "every_epochs": 2}}}
QUIET = {"eval_every": 0, "sample_every": 0, "checkpoint_every": 0}


def test_flash_trains_with_exact_log_prob_agreement(toy_registry, toy_config, tmp_path):
    out = tmp_path / "run"
    summary = train(toy_config(sampler=FLASH, train=QUIET), out)
    metrics = rows(out)
    assert all(math.isfinite(r["reward/mean"]) for r in metrics)
    assert all(r["logprob/agreement"] < 1e-5 for r in metrics)
    assert summary.reward_last > summary.reward_first + 0.15


def test_flash_resume_equals_uninterrupted(toy_registry, toy_config, tmp_path):
    path = toy_config(sampler=FLASH, train={**QUIET, "epochs": 8, "checkpoint_every": 3})
    train(path, tmp_path / "whole")
    train(path, tmp_path / "split", ["train.epochs=5"])
    assert train(path, tmp_path / "split", resume=True).resumed_from == 5
    assert same_weights(tmp_path / "whole", tmp_path / "split")
    assert [r["reward/mean"] for r in rows(tmp_path / "split")] == pytest.approx(
        [r["reward/mean"] for r in rows(tmp_path / "whole")], abs=0)
