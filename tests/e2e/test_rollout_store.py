"""Rollout store and replay: a run saves its rollouts, and another run trains on them instead of sampling."""

from __future__ import annotations

import json

import pytest
import torch
from runs import rows, train, weights
from safetensors import safe_open

from flowfactory.config import load
from flowfactory.errors import ConfigError, FlowFactoryError
from flowfactory.rewards.builtin import ColourMatch
from flowfactory.types import Samples

RUN = {"epochs": 3, "eval_every": 0, "sample_every": 0, "checkpoint_every": 0, "store_rollouts": True,
       "store_media": "float32"}


@pytest.fixture
def stored(toy_registry, toy_config, tmp_path):
    """A toy grpo run that stored its 3 epochs of rollouts (in two files per epoch: rows 0-7 and 8-15 are
    written as one process's share each would be, here one file of 16)."""
    path = toy_config(train=RUN)
    train(path, tmp_path / "a")
    return path, tmp_path / "a"


def test_the_store_is_safetensors_with_every_row(stored):
    _, run = stored
    files = sorted((run / "rollouts" / "000002").glob("*.safetensors"))
    assert [f.name for f in files] == ["rows-00000000-00000016.safetensors"]
    with safe_open(str(files[0]), framework="pt") as f:
        meta = json.loads(f.metadata()["flowfactory.rollouts"])
        assert meta["epoch"] == 2 and len(meta["prompts"]) == 16 and meta["keys"][3] == [2, 3]
        assert meta["group_ids"] == [g for g in range(2) for _ in range(8)] and meta["rewards"] == ["brightness"]
        assert set(f.keys()) == {"trajectory.sigmas", "trajectory.stochastic", "trajectory.final",
                                 "trajectory.latents", "trajectory.log_probs", "media", "reward.brightness"}
        # the stored rewards are the logged ones
        assert float(f.get_tensor("reward.brightness").mean()) == pytest.approx(rows(run)[1]["reward/mean"], abs=1e-6)


def test_replaying_a_runs_own_store_reproduces_its_weights(stored, toy_config, tmp_path):
    path, run = stored
    replay = toy_config(train={**RUN, "store_rollouts": False}, data={"replay": str(run)})
    train(replay, tmp_path / "b")
    a, b = weights(run), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["reward/mean"] for r in rows(run)] == [r["reward/mean"] for r in rows(tmp_path / "b")]


def test_another_algorithm_trains_on_the_same_samples(stored, toy_config, tmp_path):
    _, run = stored
    awm = {"name": "awm", "options": {"num_times": 2}}
    train(toy_config(optimizer=awm, train={**RUN, "store_rollouts": False}, data={"replay": str(run / "rollouts")}),
          tmp_path / "c")
    assert [r["reward/mean"] for r in rows(run)] == [r["reward/mean"] for r in rows(tmp_path / "c")]
    assert not torch.equal(weights(run)["net.0.weight"] if "net.0.weight" in weights(run) else
                           next(iter(weights(run).values())), next(iter(weights(tmp_path / "c").values())))


def test_a_replay_with_another_reward_rescores_the_stored_samples(stored, toy_config, tmp_path):
    _, run = stored
    path = toy_config(rewards=[{"name": "colour-match", "options": {"default": "red"}}],
                      train={**RUN, "store_rollouts": False}, data={"replay": str(run)})
    train(path, tmp_path / "d")
    with safe_open(str(run / "rollouts" / "000001" / "rows-00000000-00000016.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["flowfactory.rollouts"])
        media = f.get_tensor("media")
    expected = ColourMatch(default="red").score(Samples(prompts=meta["prompts"], images=media))
    assert rows(tmp_path / "d")[0]["reward/colour-match/mean"] == pytest.approx(float(expected.mean()), abs=1e-6)


def test_replay_errors_name_the_fix(stored, toy_config, tmp_path):
    _, run = stored
    with pytest.raises(ConfigError, match=r"data.replay: .* holds no stored rollouts"):
        load(toy_config(data={"replay": str(tmp_path / "nothing")}))
    with pytest.raises(FlowFactoryError, match=r"has no stored rollouts for epoch 4; it holds epochs 1, 2, 3"):
        train(toy_config(train={**RUN, "epochs": 4, "store_rollouts": False}, data={"replay": str(run)}),
              tmp_path / "e")
