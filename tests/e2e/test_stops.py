"""Runs that stop on their own or are stopped, through the real `ff` command line (tests/e2e/ff_toy.py): a NaN
loss (stop or skip), SIGTERM/SIGINT at any moment (one process or one of two), a crash before final/ is
complete, and --resume of a run stopped before its first checkpoint. Each asserts the exit code, the message,
checkpoints whose label matches their content, and bit-identical weights after --resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runs import free_port, rows, same_weights, weights

from flowfactory.train import checkpoint as ckpt

HERE = Path(__file__).parent
ENV = {**os.environ, "FLOWFACTORY_STRICT_PLUGINS": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
QUIET = {"eval_every": 0, "sample_every": 0}


def ff(*args: str, env: dict | None = None, procs: int = 1, port: int | None = None, wait: bool = True):
    """`ff ARGS` with the toy policy installed, on 1 process or under a 2-process torchrun launch."""
    port = port or free_port()
    launch = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                 str(procs), "--master_port", str(port)]
    cmd = [*launch, str(HERE / "ff_toy.py"), *args]
    if not wait:
        return subprocess.Popen(cmd, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(cmd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300)


def checkpoint_epochs(out: Path) -> list[int]:
    return [int(p.name) for p in ckpt.complete(out / "checkpoints")]


def assert_labels_match_content(out: Path, whole: Path) -> None:
    """Every checkpoint's weights are exactly the uninterrupted run's at that epoch."""
    for epoch in checkpoint_epochs(out):
        mine, _ = ckpt.load(out / "checkpoints" / f"{epoch:06d}", {})
        theirs, _ = ckpt.load(whole / "checkpoints" / f"{epoch:06d}", {})
        assert all(torch.equal(mine["model"][k], theirs["model"][k]) for k in theirs["model"]), epoch


@pytest.fixture
def nan_config(toy_config):
    return toy_config(optimizer={"name": "nan-pg", "options": {}},
                      train={"epochs": 5, "checkpoint_every": 1, "keep_checkpoints": 10, **QUIET})


def test_a_nan_loss_stops_the_run_unapplied_and_resume_finishes_it(nan_config, tmp_path):
    whole = tmp_path / "whole"
    assert ff("run", str(nan_config), "--output", str(whole)).returncode == 0
    out = tmp_path / "r"
    res = ff("run", str(nan_config), "--output", str(out), env={"FLOWFACTORY_TEST_NAN": "3"})
    assert res.returncode == 2, res.stderr
    assert "non-finite loss" in res.stderr and "epoch 3, optimizer step 1 of 1, optimizer `nan-pg`" in res.stderr
    assert "the step was not applied" in res.stderr and "train.nonfinite: skip" in res.stderr
    assert checkpoint_epochs(out) == [1, 2] and [r["epoch"] for r in rows(out)] == [1, 2]
    assert_labels_match_content(out, whole)  # epoch 2's weights, never a NaN one
    assert ff("run", str(nan_config), "--output", str(out), "--resume").returncode == 0
    assert same_weights(out, whole)


def test_nonfinite_skip_skips_the_step_and_goes_on(nan_config, tmp_path):
    out = tmp_path / "r"
    res = ff("run", str(nan_config), "--output", str(out), "--set", "train.nonfinite=skip",
             env={"FLOWFACTORY_TEST_NAN": "3"})
    assert res.returncode == 0, res.stderr
    assert "non-finite loss (gradient norm nan) in epoch 3" in res.stderr and "(train.nonfinite: skip)" in res.stderr
    assert [r["train/skipped_steps"] for r in rows(out)] == [0, 0, 1, 0, 0]
    two, _ = ckpt.load(out / "checkpoints" / "000002", {})
    three, _ = ckpt.load(out / "checkpoints" / "000003", {})
    assert all(torch.equal(two["model"][k], three["model"][k]) for k in two["model"])  # epoch 3 changed nothing
    assert all(bool(torch.isfinite(v).all()) for v in weights(out).values())


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_the_last_complete_epoch_and_resume_is_bit_identical(toy_config, tmp_path, sig, code):
    """What a scheduler's preemption (SIGTERM) or Ctrl-C does: the run stops at its next safe point with a
    checkpoint whose label matches its content, and --resume ends with the uninterrupted weights."""
    path = toy_config(train={"epochs": 60, "checkpoint_every": 25, "keep_checkpoints": 10, **QUIET})
    whole = tmp_path / "whole"
    every_epoch = ["--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=100"]
    assert ff("run", str(path), "--output", str(whole), *every_epoch).returncode == 0
    out = tmp_path / "r"
    proc = ff("run", str(path), "--output", str(out), wait=False)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len(rows(out)) < 3:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert f"{signal.Signals(sig).name}: stopping" in stderr and "--resume" in stderr
    done = [r["epoch"] for r in rows(out)]
    assert 3 <= len(done) < 60 and done == list(range(1, len(done) + 1))
    assert checkpoint_epochs(out)[-1] == done[-1]  # the last logged epoch was saved, under its own number
    assert_labels_match_content(out, whole)
    assert ff("run", str(path), "--output", str(out), "--resume").returncode == 0
    assert same_weights(out, whole)


def _pid_of_rank(marker: str, rank: int) -> int:
    for d in Path("/proc").iterdir():
        try:
            if not d.name.isdigit() or marker not in (d / "cmdline").read_bytes().decode(errors="replace"):
                continue
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return int(d.name)
    raise AssertionError(f"no process of rank {rank}")


def test_sigterm_on_one_process_of_two_stops_both_consistently(toy_config, tmp_path):
    path = toy_config(train={"epochs": 60, "checkpoint_every": 25, "keep_checkpoints": 10, **QUIET})
    whole = tmp_path / "whole"
    every_epoch = ["--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=100"]
    assert ff("run", str(path), "--output", str(whole), *every_epoch, procs=2).returncode == 0
    out = tmp_path / "r"
    proc = ff("run", str(path), "--output", str(out), procs=2, wait=False)
    deadline = time.time() + 180
    while not (out / "metrics.jsonl").exists() or len(rows(out)) < 3:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    os.kill(_pid_of_rank(str(out), 1), signal.SIGTERM)  # the scheduler reached one process only
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    done = [r["epoch"] for r in rows(out)]
    assert len(done) < 60 and checkpoint_epochs(out)[-1:] == done[-1:], stderr[-3000:]
    assert_labels_match_content(out, whole)
    assert ff("run", str(path), "--output", str(out), "--resume", procs=2).returncode == 0
    assert same_weights(out, whole)


def test_a_nan_loss_on_one_process_of_two_stops_both(nan_config, tmp_path):
    out = tmp_path / "r"
    res = ff("run", str(nan_config), "--output", str(out), procs=2, env={"FLOWFACTORY_TEST_NAN": "3:1"})
    assert res.returncode != 0
    assert res.stderr.count("non-finite") >= 2  # both processes name it: DDP averaged the NaN into every gradient
    assert checkpoint_epochs(out) == [1, 2] and [r["epoch"] for r in rows(out)] == [1, 2]
    assert ff("run", str(nan_config), "--output", str(out), "--resume", procs=2).returncode == 0
    assert [r["epoch"] for r in rows(out)] == [1, 2, 3, 4, 5]


def test_resume_writes_final_when_the_run_stopped_before_it_was_complete(toy_config, tmp_path):
    path = toy_config(train={"epochs": 4, "checkpoint_every": 2, **QUIET})
    out = tmp_path / "r"
    assert ff("run", str(path), "--output", str(out)).returncode == 0
    expected = weights(out)
    import shutil

    shutil.rmtree(out / "final")  # the crash came after the last checkpoint, before final/ was renamed into place
    (out / ".tmp-final").mkdir()
    (out / ".tmp-final" / "toy.pt").write_bytes(b"half a file")
    res = ff("run", str(path), "--output", str(out), "--resume")
    assert res.returncode == 0, res.stderr
    got = weights(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not (out / ".tmp-final").exists() and [r["epoch"] for r in rows(out)] == [1, 2, 3, 4]
    res = ff("run", str(path), "--output", str(out), "--resume")  # now complete: nothing left to do
    assert res.returncode == 2 and "already trained 4 epochs" in res.stderr


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it_afresh(toy_config, tmp_path):
    path = toy_config(train={"epochs": 4, "checkpoint_every": 0, **QUIET})
    whole = tmp_path / "whole"
    assert ff("run", str(path), "--output", str(whole)).returncode == 0
    out = tmp_path / "r"
    assert ff("run", str(path), "--output", str(out), "--set", "train.epochs=2").returncode == 0
    shutil_final = out / "final"
    import shutil

    shutil.rmtree(shutil_final)  # as if killed after two epochs, before any checkpoint
    res = ff("run", str(path), "--output", str(out), "--resume")
    assert res.returncode == 0, res.stderr
    assert "holds no checkpoint yet; --resume starts the run from epoch 1" in res.stderr
    assert [r["epoch"] for r in rows(out)] == [1, 2, 3, 4]
    assert same_weights(out, whole)


def test_a_failure_in_eval_after_the_update_saves_no_mislabelled_checkpoint(toy_config, tmp_path):
    """Epoch 2's update is done when its eval's reward fails: a checkpoint labelled 1 must not get epoch 2's
    weights, so nothing new is saved, and --resume replays epoch 2 to the uninterrupted result."""
    path = toy_config(rewards=[{"name": "flaky-on-one-process"}],
                      train={"epochs": 4, "eval_every": 1, "eval_prompts": 2, "sample_every": 0, "checkpoint_every": 1,
                             "keep_checkpoints": 10})
    whole = tmp_path / "whole"
    assert ff("run", str(path), "--output", str(whole)).returncode == 0
    out = tmp_path / "r"
    # calls: 1 train e1, 2 eval e1, 3 train e2, 4 eval e2 <- fails after epoch 2's update
    res = ff("run", str(path), "--output", str(out), env={"FLOWFACTORY_TEST_FAIL": "0:4"})
    assert res.returncode == 2 and "judge unreachable" in res.stderr, res.stderr
    assert checkpoint_epochs(out) == [1] and [r["epoch"] for r in rows(out)] == [1]
    assert_labels_match_content(out, whole)
    assert ff("run", str(path), "--output", str(out), "--resume").returncode == 0
    assert same_weights(out, whole)
