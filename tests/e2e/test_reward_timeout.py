"""A reward that hangs past `rewards[i].timeout` stops the run cleanly: the last complete epoch is checkpointed."""

from __future__ import annotations

import threading
import time

import pytest

from flowfactory.config import load
from flowfactory.errors import RewardError
from flowfactory.registry import ComponentSpec, NoOptions
from flowfactory.train import checkpoint as ckpt
from flowfactory.train import run


class HangsAt:
    """Brightness until call `at`, which blocks until released (a judge that stopped answering)."""

    groupwise = False
    handles_video = False

    def __init__(self, at: int):
        self.calls, self.at = 0, at
        self.release = threading.Event()

    def score(self, samples):
        self.calls += 1
        if self.calls >= self.at:
            self.release.wait(60)
        return samples.images.mean(dim=(1, 2, 3))


def test_a_hung_reward_times_out_and_the_last_epoch_is_kept(toy_registry, toy_config, tmp_path):
    hang = HangsAt(at=3)  # epochs 1 and 2 score; epoch 3's call hangs
    toy_registry._specs["reward"]["slow-judge"] = ComponentSpec("reward", "slow-judge", lambda o, c: hang, NoOptions,
                                                                "slow judge", "tests", "0")
    path = toy_config(rewards=[{"name": "slow-judge", "timeout": 0.5}],
                      train={"epochs": 5, "eval_every": 0, "sample_every": 0, "checkpoint_every": 10})
    cfg, options = load(path)
    t0 = time.perf_counter()
    try:
        with pytest.raises(RewardError, match=r"reward 'slow-judge' did not answer within 0\.5 s "
                                              r"\(rewards\[0\]\.timeout\).*Raise rewards\[0\]\.timeout or fix the "
                                              r"scorer; no weights were changed this epoch"):
            run(cfg, options, output_dir=str(tmp_path / "r"), show_progress=False)
    finally:
        hang.release.set()
    assert time.perf_counter() - t0 < 60
    assert hang.calls == 3
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["000002"]
    _, meta = ckpt.load(tmp_path / "r" / "checkpoints" / "000002", {})
    assert meta["epoch"] == 2
