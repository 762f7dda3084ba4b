"""Guards against reward hacking: eval rewards the policy never trains on, best/ kept at the best eval, and a
guard that stops the run when the gold eval metric falls while the training reward keeps rising."""

from __future__ import annotations

import json

import pytest
import torch
from runs import rows, train

from flowfactory.config import load
from flowfactory.errors import ConfigError
from flowfactory.registry import ComponentSpec, NoOptions
from flowfactory.train import checkpoint as ckpt
from flowfactory.train.guard import RewardHackingError


class MidGrey:
    """The gold reward: 1 - 2 |brightness - target|. Brightness (the training reward) agrees with it while the
    images are darker than the target, then disagrees: pushing brightness past it is reward hacking."""

    groupwise = False
    handles_video = False

    def __init__(self, target: float):
        self.target = target

    def score(self, samples):
        b = samples.images.float().mean(dim=(1, 2, 3))
        return (1 - 2 * (b - self.target).abs()).float()


def _register_gold(registry, target):
    registry._specs["reward"]["mid-grey"] = ComponentSpec("reward", "mid-grey", lambda o, c: MidGrey(target),
                                                          NoOptions, "gold", "tests", "0")


GOLD = {"rewards": [{"name": "mid-grey"}], "best": "eval/reward/mid-grey/mean",
        "guard": {"drop": 0.02, "patience": 2}}
RUN = {"epochs": 30, "eval_every": 1, "eval_prompts": 2, "sample_every": 0, "checkpoint_every": 1,
       "keep_checkpoints": 30, "lr": 2e-3}


def test_the_guard_stops_a_hacked_run_and_best_holds_the_best_gold_epoch(toy_registry, toy_config, tmp_path):
    _register_gold(toy_registry, 0.6)
    path = toy_config(train=RUN, eval=GOLD)
    out = tmp_path / "run"
    with pytest.raises(RewardHackingError, match=r"reward hacking suspected: eval metric eval/reward/mid-grey/mean "
                                                 r"fell from its best") as exc:
        train(path, out)
    assert exc.value.exit_code == 3
    log = rows(out)
    evals = [(r["epoch"], r["eval/reward/mid-grey/mean"]) for r in log if "eval/reward/mid-grey/mean" in r]
    best_epoch, best_value = max(evals, key=lambda e: e[1])
    stopped = log[-1]["epoch"]
    # the gold metric fell by more than the drop at the last two evals, while brightness kept rising
    assert [v < best_value - 0.02 for _, v in evals[-2:]] == [True, True]
    assert stopped < RUN["epochs"] and stopped == evals[-1][0]
    train_mean = {r["epoch"]: r["reward/mean"] for r in log}
    assert train_mean[stopped] > train_mean[best_epoch]
    # best/ holds the weights as they were at the best gold eval: equal to that epoch's checkpoint
    info = json.loads((out / "best" / "best.json").read_text())
    assert info == {"epoch": best_epoch, "metric": "eval/reward/mid-grey/mean", "value": best_value, "ema": False}
    state, _ = ckpt.load(out / "checkpoints" / f"{best_epoch:06d}", {})
    best_weights = torch.load(out / "best" / "toy.pt")
    assert all(torch.equal(best_weights[f"{k.removeprefix('net.')}"], v) for k, v in state["model"].items())
    # the stop is checkpointed, and the message says how to go on
    assert ckpt.read_meta(ckpt.latest(out / "checkpoints"))["epoch"] == stopped
    assert "eval.guard" in str(exc.value) and "--resume" in str(exc.value)


def test_without_the_guard_the_run_ends_and_best_still_holds_the_best_epoch(toy_registry, toy_config, tmp_path):
    _register_gold(toy_registry, 0.6)
    path = toy_config(train={**RUN, "epochs": 12}, eval={**GOLD, "guard": {"drop": None}})
    summary = train(path, tmp_path / "run")
    evals = [(r["epoch"], r["eval/reward/mid-grey/mean"]) for r in rows(tmp_path / "run")]
    best_epoch, best_value = max(evals, key=lambda e: e[1])
    assert summary.best == {"metric": "eval/reward/mid-grey/mean", "value": best_value, "epoch": best_epoch,
                            "dir": str(tmp_path / "run" / "best")}
    # eval scores the gold reward only; training logs brightness only
    last = rows(tmp_path / "run")[-1]
    assert "eval/reward/brightness/mean" not in last and "reward/mid-grey/mean" not in last


def test_a_kl_bound_stops_the_run_and_the_estimate_is_logged(toy_registry, toy_config, tmp_path):
    path = toy_config(train={**RUN, "epochs": 30, "eval_every": 0}, eval={"guard": {"max_kl": 1e-3}})
    with pytest.raises(RewardHackingError, match=r"estimated KL to the reference policy reached"):
        train(path, tmp_path / "run")
    kl = [r["kl/reference"] for r in rows(tmp_path / "run")]
    assert kl[-1] > 1e-3 and all(k <= 1e-3 for k in kl[:-1]) and kl[0] >= 0


def test_eval_settings_are_checked(toy_registry, toy_config):
    _register_gold(toy_registry, 0.6)
    with pytest.raises(ConfigError, match=r"eval.best: 'eval/reward/gold/mean' is not an eval metric"):
        load(toy_config(eval={"best": "eval/reward/gold/mean"}))
    with pytest.raises(ConfigError, match=r"eval.guard.drop: the guard watches the eval.best metric"):
        load(toy_config(eval={"guard": {"drop": 0.1}}))
    with pytest.raises(ConfigError, match=r"eval.best: needs evals"):
        load(toy_config(train={"eval_every": 0}, eval={"best": "eval/reward/mean"}))
