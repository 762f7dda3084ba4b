"""End-to-end reward back-propagation (`draft`) on the toy policy: learning, exact resume, a refused reward."""

from __future__ import annotations

import pytest
from runs import rows, same_weights, train

from flowfactory.config import load
from flowfactory.errors import ConfigError, FlowFactoryError

ODE6 = {"name": "ode", "options": {"steps": 6}}
QUIET = {"eval_every": 0, "sample_every": 0, "checkpoint_every": 0}


def test_brightness_rises_through_the_rewards_gradient(toy_registry, toy_config, tmp_path):
    """DRaFT-2 on brightness: the toy policy's images go from mid-grey to white within 10 epochs, and each
    epoch's re-run of the last steps lands exactly on the rollout's final state."""
    path = toy_config(sampler=ODE6, optimizer={"name": "draft", "options": {"k": 2}}, train={"epochs": 10, **QUIET})
    summary = train(path, tmp_path / "run")
    log = rows(tmp_path / "run")
    assert log[0]["reward/mean"] < 0.6 and summary.reward_last > 0.95
    assert summary.reward_last > summary.reward_first + 0.25
    assert all(r["draft/agreement"] == 0.0 for r in log)
    assert all(r["loss"] == pytest.approx(-r["draft/reward"]) for r in log)
    # the update of an epoch starts from its rollout's policy: the differentiated reward is the sampled reward
    assert log[0]["draft/reward"] == pytest.approx(log[0]["reward/mean"], abs=1e-6)


@pytest.mark.parametrize("options", [{"variant": "draft-lv", "lv_samples": 2}, {"variant": "refl", "k": 3}],
                         ids=["draft-lv", "refl"])
def test_resume_equals_uninterrupted(toy_registry, toy_config, tmp_path, options):
    """Keyed draws (DRaFT-LV's noise, ReFL's steps): a run resumed at epoch 2 ends bit-identical."""
    path = toy_config(sampler=ODE6, optimizer={"name": "draft", "options": options},
                      train={"epochs": 4, "eval_every": 0, "sample_every": 0, "checkpoint_every": 2})
    train(path, tmp_path / "full")
    train(path, tmp_path / "split", ["train.epochs=2"])
    assert train(path, tmp_path / "split", resume=True).resumed_from == 2
    assert same_weights(tmp_path / "full", tmp_path / "split")
    assert [r["reward/mean"] for r in rows(tmp_path / "full")] == [r["reward/mean"] for r in rows(tmp_path / "split")]


def test_a_non_differentiable_reward_stops_the_build_naming_it(toy_registry, toy_config, tmp_path):
    path = toy_config(sampler=ODE6, optimizer={"name": "draft", "options": {}},
                      rewards=[{"name": "brightness"}, {"name": "jpeg-compressibility"}], train={"epochs": 2, **QUIET})
    with pytest.raises(FlowFactoryError, match=r"rewards\[1\]\.name: reward 'jpeg-compressibility' is not "
                                               r"differentiable"):
        train(path, tmp_path / "run")
    assert not (tmp_path / "run" / "final").exists()


def test_validate_refuses_more_differentiated_steps_than_the_sampler_has(toy_registry, toy_config):
    path = toy_config(sampler=ODE6, optimizer={"name": "draft", "options": {"k": 7}})
    with pytest.raises(ConfigError, match=r"k=7 differentiated steps exceed the sampler's 6 steps"):
        load(path)
