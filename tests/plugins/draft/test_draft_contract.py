"""flowfactory's optimizer contract suite, run on every variant of draft (rewards: brightness and colour-match)."""

from __future__ import annotations

from flowfactory.testing import OptimizerContract

REWARDS = (("brightness", {}, 1.0), ("colour-match", {"tolerance": 0.5}, 0.5))


class TestDraftContract(OptimizerContract):
    component = "draft"
    options = {"k": 2}
    rewards = REWARDS


class TestDraftNoCheckpointingContract(OptimizerContract):
    component = "draft"
    options = {"k": 4, "checkpointing": False}


class TestReFLContract(OptimizerContract):
    component = "draft"
    options = {"variant": "refl", "k": 3}
    rewards = REWARDS


class TestDraftLVContract(OptimizerContract):
    component = "draft"
    options = {"variant": "draft-lv", "lv_samples": 2}
