"""End-to-end AWM training on the toy policy: the reward rises, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flowfactory.config import load
from flowfactory.train import run

AWM = {"name": "awm", "options": {"num_times": 2, "time_type": "uniform", "weighting": "uniform",
                                  "clip_range": 0.2, "kl_beta": 0.01, "ema_kl_beta": 0.1}}
ODE = {"name": "ode", "options": {"steps": 6}}
QUIET = {"eval_every": 0, "sample_every": 0}


def rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def train(path: Path, out: Path, overrides: list[str] | None = None, resume: bool = False):
    cfg, options = load(path, overrides)
    return run(cfg, options, output_dir=str(out), resume=resume, show_progress=False)


def test_awm_reward_rises(toy_registry, toy_config, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = train(toy_config(optimizer=AWM, sampler=ODE, train=QUIET), out)
    log = rows(out)
    assert [r["epoch"] for r in log] == list(range(1, 21))
    assert summary.reward_last > summary.reward_first + 0.1, (summary.reward_first, summary.reward_last)
    assert {"awm/policy_loss", "awm/log_p", "awm/ratio", "awm/kl", "awm/ema_kl"} <= set(log[-1])


def test_awm_resume_equals_uninterrupted(toy_registry, toy_config, tmp_path: Path) -> None:
    # two optimizer steps per epoch, so the old-policy snapshot and the EMA policy both matter
    train_opts = {**QUIET, "epochs": 10, "checkpoint_every": 2, "steps_per_epoch": 2}
    path = toy_config(optimizer=AWM, sampler=ODE, train=train_opts)
    train(path, tmp_path / "full")
    train(path, tmp_path / "part", ["train.epochs=6"])
    summary = train(path, tmp_path / "part", resume=True)
    assert summary.resumed_from == 6
    a = torch.load(tmp_path / "full" / "final" / "toy.pt")
    b = torch.load(tmp_path / "part" / "final" / "toy.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows(tmp_path / "full")[-1]["reward/mean"] == rows(tmp_path / "part")[-1]["reward/mean"]


def test_awm_default_times_do_not_depend_on_the_micro_batch_size(toy_registry, toy_config, tmp_path: Path) -> None:
    """`discrete` times (the default) are shared by the whole pass, so micro-batches of 4 or 16 give one update
    (they gave 1.2e-2 max weight difference when each micro-batch drew its own)."""
    awm = {"name": "awm", "options": {"num_times": 2}}  # time_type: discrete
    for mb in (16, 4):
        train(toy_config(optimizer=awm, sampler=ODE, train={**QUIET, "epochs": 3, "micro_batch_size": mb,
                                                             "checkpoint_every": 0}), tmp_path / f"mb{mb}")
    a = torch.load(tmp_path / "mb16" / "final" / "toy.pt")
    b = torch.load(tmp_path / "mb4" / "final" / "toy.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
