"""End-to-end DiffusionNFT on the toy policy: the reward rises, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flowfactory.config import load
from flowfactory.train import checkpoint as ckpt
from flowfactory.train import run

NFT = {"name": "nft", "options": {"num_times": 2}}
NFT_FAST_DECAY = {"name": "nft", "options": {"num_times": 2, "old_decay_rate": 0.05}}  # old policy lags visibly
ODE = {"name": "ode", "options": {"steps": 6}}


def rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final" / "toy.pt")


def train(path: Path, out: Path, overrides: list[str] | None = None, resume: bool = False):
    cfg, options = load(path, overrides)
    return run(cfg, options, output_dir=str(out), resume=resume, show_progress=False)


def test_nft_reward_rises(toy_registry, toy_config, tmp_path):
    path = toy_config(sampler=ODE, optimizer=NFT,
                      train={"epochs": 20, "eval_every": 10, "sample_every": 0, "checkpoint_every": 0})
    summary = train(path, tmp_path / "run")
    log = rows(tmp_path / "run")
    assert [r["epoch"] for r in log] == list(range(1, 21))
    assert summary.reward_last > summary.reward_first + 0.15, (summary.reward_first, summary.reward_last)
    for r in log:
        assert {"nft/policy_loss", "nft/positive_loss", "nft/negative_loss", "nft/r", "nft/old_deviate",
                "nft/old_decay"} <= set(r)
    # the old policy's decay follows min(step * rate, 0.5), step = optimizer steps before the epoch
    assert log[4]["nft/old_decay"] == pytest.approx(0.004) and log[-1]["nft/old_decay"] == pytest.approx(0.019)


def test_nft_resume_equals_uninterrupted(toy_registry, toy_config, tmp_path):
    path = toy_config(sampler=ODE, optimizer=NFT_FAST_DECAY,
                      train={"epochs": 10, "steps_per_epoch": 2, "micro_batch_size": 4, "eval_every": 0,
                             "sample_every": 0, "checkpoint_every": 3})
    train(path, tmp_path / "full")
    train(path, tmp_path / "split", ["train.epochs=6"])
    state, _ = ckpt.load(ckpt.latest(tmp_path / "split" / "checkpoints"), {})
    algo = state["algorithm"]
    assert algo["steps"] == 12 and algo["ema"] is not None
    summary = train(path, tmp_path / "split", resume=True)
    assert summary.resumed_from == 6
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    full, split = rows(tmp_path / "full"), rows(tmp_path / "split")
    assert [r["reward/mean"] for r in full] == [r["reward/mean"] for r in split]
