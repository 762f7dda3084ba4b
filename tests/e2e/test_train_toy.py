"""End-to-end training on the toy policy: learning, agreement, outputs, resume, failures."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowfactory.config import load
from flowfactory.errors import FlowFactoryError, RewardError
from flowfactory.train import checkpoint as ckpt
from flowfactory.train import run
from flowfactory.types import OptimizerHooks

HERE = Path(__file__).parent


def rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final" / "toy.pt")


def train(path: Path, out: Path, overrides: list[str] | None = None, resume: bool = False):
    cfg, options = load(path, overrides)
    return run(cfg, options, output_dir=str(out), resume=resume, show_progress=False)


def test_reward_rises_and_outputs_are_written(toy_registry, toy_config, tmp_path):
    out = tmp_path / "run"
    summary = train(toy_config(), out)
    log = rows(out)
    assert [r["epoch"] for r in log] == list(range(1, 21))
    assert summary.reward_last > summary.reward_first + 0.15
    first5 = sum(r["reward/mean"] for r in log[:5]) / 5
    assert summary.reward_first == pytest.approx(first5)
    for r in log:
        assert {"epoch", "reward/mean", "reward/brightness/mean", "loss", "logprob/agreement"} <= set(r)
        assert r["logprob/agreement"] < 1e-5  # sampling and training log-probs agree in float32
    assert "eval/reward/mean" in log[4] and "eval/reward/mean" not in log[3]
    assert (out / "final" / "toy.pt").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000015", "000020"]  # keep=2
    assert (out / "samples" / "train-000005.png").is_file() and (out / "samples" / "eval-000020.png").is_file()
    assert any((out / "tensorboard").iterdir())


def test_deterministic_for_a_seed(toy_registry, toy_config, tmp_path):
    path = toy_config(train={"epochs": 3, "checkpoint_every": 0, "eval_every": 0, "sample_every": 0})
    train(path, tmp_path / "a")
    train(path, tmp_path / "b")
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows(tmp_path / "a")[-1]["reward/mean"] == rows(tmp_path / "b")[-1]["reward/mean"]


def test_micro_batch_size_does_not_change_the_update(toy_registry, toy_config, tmp_path):
    path = toy_config(train={"epochs": 2, "checkpoint_every": 0, "eval_every": 0, "sample_every": 0})
    train(path, tmp_path / "a", ["train.micro_batch_size=16"])
    train(path, tmp_path / "b", ["train.micro_batch_size=4"])
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in a:  # float32 summation order differs; Adam can turn that into ~1e-6 of a 3e-3 step
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_resume_extends_and_equals_uninterrupted(toy_registry, toy_config, tmp_path):
    path = toy_config(train={"epochs": 10, "eval_every": 0, "sample_every": 0, "checkpoint_every": 3})
    train(path, tmp_path / "full")
    train(path, tmp_path / "split", ["train.epochs=6"])
    summary = train(path, tmp_path / "split", resume=True)
    assert summary.resumed_from == 6
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in rows(tmp_path / "split")] == list(range(1, 11))


def test_existing_run_is_not_overwritten(toy_registry, toy_config, tmp_path):
    path = toy_config(train={"epochs": 1, "eval_every": 0, "sample_every": 0})
    train(path, tmp_path / "r")
    with pytest.raises(FlowFactoryError, match="already holds a run.*--resume"):
        train(path, tmp_path / "r")


def test_resume_refuses_a_changed_config(toy_registry, toy_config, tmp_path):
    path = toy_config(train={"epochs": 2, "eval_every": 0, "sample_every": 0, "checkpoint_every": 1})
    train(path, tmp_path / "r")
    with pytest.raises(FlowFactoryError, match=r"config changed at train\.lr"):
        train(path, tmp_path / "r", ["train.lr=0.1", "train.epochs=4"], resume=True)


class FailingReward:
    """Brightness until `fail_at` calls, then an exception (a remote judge going down)."""

    groupwise = False
    handles_video = False

    def __init__(self, fail_at: int):
        self.calls, self.fail_at = 0, fail_at

    def score(self, samples):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise ConnectionError("judge unreachable")
        return samples.images.mean(dim=(1, 2, 3))


def test_failing_reward_stops_before_any_update_and_keeps_the_last_epoch(toy_registry, toy_config, tmp_path, monkeypatch):
    from flowfactory.registry import ComponentSpec, NoOptions

    failing = FailingReward(fail_at=3)  # epochs 1 and 2 score fine; epoch 3 fails
    toy_registry._specs["reward"]["flaky"] = ComponentSpec("reward", "flaky", lambda o, c: failing, NoOptions,
                                                           "flaky", "tests", "0")
    path = toy_config(rewards=[{"name": "flaky"}],
                      train={"epochs": 5, "eval_every": 0, "sample_every": 0, "checkpoint_every": 10})
    with pytest.raises(RewardError, match="flaky.*ConnectionError.*judge unreachable.*--resume"):
        train(path, tmp_path / "r")
    ckpts = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert ckpts == ["000002"]  # the last complete epoch was saved on the way out
    # the saved weights are exactly those of a clean 2-epoch run
    failing.calls, failing.fail_at = 0, 100
    train(path, tmp_path / "two", ["train.epochs=2"])
    state, meta = ckpt.load(tmp_path / "r" / "checkpoints" / "000002", {})
    two = weights(tmp_path / "two")
    assert meta["epoch"] == 2 and state["model"].keys() == two.keys()
    assert all(torch.equal(state["model"][k], two[k]) for k in two)


def test_resume_after_kill_9_equals_uninterrupted(toy_registry, toy_config, tmp_path):
    """A run killed with SIGKILL mid-run, resumed with --resume, ends with the uninterrupted weights."""
    path = toy_config(train={"epochs": 80, "eval_every": 0, "sample_every": 0, "checkpoint_every": 2,
                             "keep_checkpoints": 100})
    out = tmp_path / "killed"
    cmd = [sys.executable, str(HERE / "run_toy.py"), str(path), str(out)]
    proc = subprocess.Popen(cmd, env={**os.environ, "FLOWFACTORY_STRICT_PLUGINS": "1"})
    deadline = time.time() + 120
    while not (out / "checkpoints" / "000006").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = len(rows(out))
    assert done < 80 and not (out / "final").exists()
    subprocess.run(cmd + ["--resume"], check=True, env={**os.environ, "FLOWFACTORY_STRICT_PLUGINS": "1"})
    train(path, tmp_path / "whole")
    a, b = weights(tmp_path / "whole"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in rows(out)] == list(range(1, 81))


ODE6 = {"name": "ode", "options": {"steps": 6}}


@pytest.mark.parametrize("sections, atol", [
    ({}, 1e-5),  # grpo over flow-sde
    ({"sampler": ODE6, "optimizer": {"name": "nft", "options": {"num_times": 2}}}, 1e-5),
    # awm: seen 5.6e-5 on 1 of 9216 weights (2% of one Adam step): summation-order rounding, which Adam's
    # normalisation magnifies where a gradient is near zero; the rewards still agree within 1e-5
    ({"sampler": ODE6, "optimizer": {"name": "awm", "options": {"num_times": 2, "time_type": "uniform"}}}, 1e-4),
], ids=["grpo", "nft", "awm"])
def test_two_processes_equal_one_process(toy_registry, toy_config, tmp_path, sections, atol):
    """2 CPU processes (gloo) with the same global batch end with the 1-process weights. For nft and awm this
    holds because their training times and noise are drawn per rollout from its key, not per micro-batch."""
    path = toy_config(train={"epochs": 4, "eval_every": 2, "sample_every": 0, "checkpoint_every": 0}, **sections)
    train(path, tmp_path / "one")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "FLOWFACTORY_STRICT_PLUGINS": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", "29517", str(HERE / "run_toy.py"), str(path), str(tmp_path / "two")],
                   check=True, env=env, timeout=300)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:  # equal up to float32 summation order (Adam steps are 3e-3)
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4)
    r1, r2 = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["reward/mean"] for r in r1] == pytest.approx([r["reward/mean"] for r in r2], abs=1e-5)
    assert r1[1]["eval/reward/mean"] == pytest.approx(r2[1]["eval/reward/mean"], abs=1e-5)


def test_ema_weights_follow_the_trained_weights_step_by_step(toy_registry, toy_config, tmp_path):
    """final/ema holds ema_k = d ema_(k-1) + (1 - d) w_k from the initial weights, one update per step."""
    from flowfactory.testing.toy import ToyPolicy

    d = 0.5
    path = toy_config(train={"epochs": 4, "eval_every": 0, "sample_every": 0, "checkpoint_every": 1,
                             "keep_checkpoints": 10, "ema": {"enabled": True, "decay": d}})
    train(path, tmp_path / "r")
    ema = {n: p.detach().float().clone() for n, p in ToyPolicy(seed=0, size=8).net.named_parameters()}
    for epoch in range(1, 5):
        state, _ = ckpt.load(tmp_path / "r" / "checkpoints" / f"{epoch:06d}", {})
        ema = {n: d * e + (1 - d) * state["model"][n] for n, e in ema.items()}
        torch.testing.assert_close(state["ema"]["shadow"], ema, atol=1e-6, rtol=1e-6)  # checkpointed by name
    saved = torch.load(tmp_path / "r" / "final" / "ema" / "toy.pt")
    assert saved.keys() == ema.keys()
    for n, expected in ema.items():
        torch.testing.assert_close(saved[n], expected, atol=1e-6, rtol=1e-6)
    trained = weights(tmp_path / "r")
    assert any(not torch.equal(trained[k], saved[k]) for k in trained)


class RecordingPG(OptimizerHooks):
    """A REINFORCE optimizer that uses every optional hook and records when the loop calls them."""

    from flowfactory.types import Requirements as _R

    requirements = _R(keep="steps", stochastic=True)

    def __init__(self):
        self.calls: list[str] = []
        self.steps = 0  # checkpointed state
        self.sampling_params: list[torch.Tensor] = []
        self.keys: list[tuple[int, ...]] = []  # TrainBatch.sample_keys seen by units()

    def setup(self, policy, sampler):
        self.calls.append("setup")

    def units(self, batch):
        self.keys.extend(batch.row_keys())
        return batch.trajectory.stochastic_steps()

    def loss(self, policy, sampler, batch, unit):
        from flowfactory.types import LossOutput

        if not self.calls or self.calls[-1] != "loss":
            self.calls.append("loss")
        lp = sampler.log_prob(policy, batch.trajectory, unit, batch.cond).log_prob
        return LossOutput(loss=-batch.advantages * lp)

    def sampling(self, policy):
        from contextlib import contextmanager

        @contextmanager
        def ctx():
            self.calls.append("sampling")
            yield
            self.calls.append("sampling-end")

        return ctx()

    def on_rollout(self, policy):
        self.calls.append("on_rollout")

    def on_step(self, policy):
        self.calls.append("on_step")
        self.steps += 1

    def on_epoch_end(self, policy):
        self.calls.append("on_epoch_end")

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.calls.append(f"load:{state['steps']}")
        self.steps = state["steps"]


def test_loop_calls_the_optional_algorithm_hooks_and_checkpoints_their_state(toy_registry, toy_config, tmp_path):
    from flowfactory.registry import ComponentSpec, NoOptions

    algos = []

    def build(options, ctx):
        algos.append(RecordingPG())
        return algos[-1]

    toy_registry._specs["optimizer"]["recording"] = ComponentSpec("optimizer", "recording", build, NoOptions,
                                                                  "", "tests", "0")
    path = toy_config(optimizer={"name": "recording", "options": {}},
                      train={"epochs": 2, "eval_every": 0, "sample_every": 0, "checkpoint_every": 1,
                             "steps_per_epoch": 2, "micro_batch_size": 4})
    train(path, tmp_path / "r")
    epoch = ["sampling", "sampling-end", "on_rollout", "loss", "on_step", "loss", "on_step", "on_epoch_end"]
    assert algos[-1].calls == ["setup"] + epoch * 2  # (validation builds one too, to check the sampler)
    # every rollout reaches the algorithm once per epoch, keyed (epoch, inner epoch, global sample index)
    assert sorted(algos[-1].keys) == [(e, 0, i) for e in (1, 2) for i in range(16)]
    state, _ = ckpt.load(tmp_path / "r" / "checkpoints" / "000002", {})
    assert state["algorithm"] == {"steps": 4}
    train(path, tmp_path / "r", ["train.epochs=3"], resume=True)
    assert algos[-1].calls == ["setup", "load:4"] + epoch and algos[-1].steps == 6


@pytest.mark.parametrize("optimizer, reference", [
    ({"name": "grpo", "options": {"clip_range": 0.2}}, False),
    ({"name": "grpo", "options": {"clip_range": 0.2, "kl_beta": 0.01}}, True),
    ({"name": "nft", "options": {"num_times": 2}}, False),
    ({"name": "awm", "options": {"num_times": 2, "kl_beta": 0.01}}, True),
    ({"name": "awm", "options": {"num_times": 2, "ema_kl_beta": 0.1}}, False),  # KL to the EMA policy only
])
def test_policy_is_built_with_a_reference_only_when_the_algorithm_uses_it(toy_registry, toy_config, tmp_path,
                                                                           optimizer, reference):
    """The loop tells the policy (BuildContext.reference) whether the run will call policy.reference(), so a
    full finetune without a KL term keeps no frozen copy of its transformer."""
    from flowfactory.registry import ComponentSpec

    toy = toy_registry.get("policy", "toy")
    seen = []

    def build(options, ctx):
        seen.append(ctx.reference)
        return toy.build(options, ctx)

    toy_registry._specs["policy"]["toy"] = ComponentSpec("policy", "toy", build, toy.options, "", "tests", "0")
    sampler = {"name": "ode", "options": {"steps": 4}} if optimizer["name"] != "grpo" else None
    sections = {"optimizer": optimizer, **({"sampler": sampler} if sampler else {})}
    path = toy_config(train={"epochs": 1, "eval_every": 0, "sample_every": 0, "checkpoint_every": 0}, **sections)
    train(path, tmp_path / "r")
    assert seen == [reference]


@pytest.mark.parametrize(("epochs", "window"), [(1, 0), (3, 1), (8, 4), (12, 5)])
def test_summary_compares_windows_that_do_not_overlap(toy_registry, toy_config, tmp_path, epochs, window):
    """A run shorter than 10 epochs compares its first and last floor(n / 2) epochs, one epoch is too short
    to compare, and a run that wrote no sample grid names no samples folder."""
    out = tmp_path / "run"
    summary = train(toy_config(train={"epochs": epochs, "sample_every": 0, "eval_every": 0, "checkpoint_every": 0}), out)
    rewards = [r["reward/mean"] for r in rows(out)]
    assert summary.window == window
    if window:
        assert summary.reward_first == pytest.approx(sum(rewards[:window]) / window)
        assert summary.reward_last == pytest.approx(sum(rewards[-window:]) / window)
    else:
        assert math.isnan(summary.reward_first) and math.isnan(summary.reward_last)
    assert summary.samples_dir is None and not (out / "samples").exists()
