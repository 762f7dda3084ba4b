"""MixGRPO end to end on the toy policy: flow-sde with a sliding SDE window (`sde_window_schedule`) and grpo,
which trains exactly the window's steps. It learns, trains each epoch on that epoch's window only, and a
resumed run equals an uninterrupted one while the window moves across the resume point. (Two processes
equal one: tests/e2e/test_parallel.py, case `mixgrpo`.)"""

from __future__ import annotations

import pytest
from runs import rows, same_weights, train

from flowfactory_grpo.loss import GRPO

SLIDING = {"name": "flow-sde", "options": {"steps": 6, "sde_window_size": 2,
                                           "sde_window_schedule": {"type": "sliding", "every_epochs": 2}}}
QUIET = {"eval_every": 0, "sample_every": 0, "checkpoint_every": 0}


def window_at(epoch: int) -> list[int]:
    """6 steps, the last one deterministic: window starts 0..3, one more step every 2 epochs, then from 0."""
    start = ((epoch - 1) // 2) % 4
    return [start, start + 1]


def test_reward_rises_training_only_each_epochs_window(toy_registry, toy_config, tmp_path, monkeypatch):
    trained: dict[int, set[int]] = {}
    units = GRPO.units

    def recording(self, batch):
        steps = units(self, batch)
        epoch = batch.pass_key()[0]
        trained.setdefault(epoch, set()).update(steps)
        return steps

    monkeypatch.setattr(GRPO, "units", recording)
    out = tmp_path / "run"
    summary = train(toy_config(sampler=SLIDING, train=QUIET), out)
    assert summary.reward_last > summary.reward_first + 0.15
    assert all(r["logprob/agreement"] < 1e-5 for r in rows(out))
    assert trained == {e: set(window_at(e)) for e in range(1, 21)}


def test_resume_across_a_window_shift_equals_uninterrupted(toy_registry, toy_config, tmp_path):
    path = toy_config(sampler=SLIDING, train={**QUIET, "epochs": 10, "checkpoint_every": 3})
    train(path, tmp_path / "whole")
    train(path, tmp_path / "split", ["train.epochs=5"])  # windows start 0,0,1,1,2 | 2,3,3,0,0: a shift and a restart
    summary = train(path, tmp_path / "split", resume=True)
    assert summary.resumed_from == 5
    assert same_weights(tmp_path / "whole", tmp_path / "split")
    assert [r["reward/mean"] for r in rows(tmp_path / "split")] == pytest.approx(
        [r["reward/mean"] for r in rows(tmp_path / "whole")], abs=0)
