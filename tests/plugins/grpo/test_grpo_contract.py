"""flowfactory's optimizer contract suite, run on grpo with and without the KL term."""

from __future__ import annotations

from flowfactory.testing import OptimizerContract


class TestGRPOContract(OptimizerContract):
    component = "grpo"
    options = {"clip_range": 0.2}


class TestGRPOWithKLContract(OptimizerContract):
    component = "grpo"
    options = {"clip_range": 1e-4, "kl_beta": 0.04}


class TestGRPOGuardContract(OptimizerContract):
    component = "grpo"
    options = {"clip_range": 0.2, "guard": True}


class TestGRPOGuardWithKLContract(OptimizerContract):
    component = "grpo"
    options = {"clip_range": 1e-4, "kl_beta": 0.04, "guard": True, "guard_reweight": False}
