"""flowfactory's optimizer contract suite, run on awm with its weightings, time samplers and KL terms."""

from __future__ import annotations

from flowfactory.testing import OptimizerContract


class TestAWMContract(OptimizerContract):
    component = "awm"
    options = {"num_times": 2}
    rows_independent = False  # discrete times are shared by a micro-batch, drawn from its first row's key


class TestAWMUniformTimesWithKLContract(OptimizerContract):
    component = "awm"
    options = {"num_times": 2, "time_type": "uniform", "weighting": "huber", "kl_beta": 0.01, "ema_kl_beta": 0.1,
               "kl_weight": "elbo"}


class TestAWMLogitNormalOffPolicyContract(OptimizerContract):
    component = "awm"
    options = {"num_times": 3, "time_type": "logit_normal", "weighting": "t^2", "off_policy": True,
               "ema_update": "step", "ema_decay_schedule": "constant"}
    rows_independent = False  # logit-normal times are shared by a micro-batch
