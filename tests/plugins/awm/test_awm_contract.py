"""flowfactory's optimizer contract suite, run on awm with its weightings, time samplers and KL terms."""

from __future__ import annotations

from flowfactory.testing import OptimizerContract


class TestAWMContract(OptimizerContract):
    component = "awm"
    options = {"num_times": 2}
    rows_independent = False  # eps is drawn for the whole micro-batch from the unit's seed


class TestAWMUniformTimesWithKLContract(OptimizerContract):
    component = "awm"
    options = {"num_times": 2, "time_type": "uniform", "weighting": "huber", "kl_beta": 0.01, "ema_kl_beta": 0.1,
               "kl_weight": "elbo"}
    rows_independent = False


class TestAWMLogitNormalOffPolicyContract(OptimizerContract):
    component = "awm"
    options = {"num_times": 3, "time_type": "logit_normal", "weighting": "t^2", "off_policy": True,
               "ema_update": "step", "ema_decay_schedule": "constant"}
    rows_independent = False
