"""flowfactory's optimizer contract suite, run on nft with its default and other time samplings and the KL."""

from __future__ import annotations

from flowfactory.testing import OptimizerContract


class TestNFTContract(OptimizerContract):
    component = "nft"
    options = {}


class TestNFTUniformWithKLContract(OptimizerContract):
    component = "nft"
    options = {"time_sampling": "uniform", "num_times": 2, "kl_beta": 0.01, "beta": 0.1, "time_shift": 3.0}


class TestNFTLogitNormalContract(OptimizerContract):
    component = "nft"
    options = {"time_sampling": "logit-normal", "num_times": 3, "old_update": "step"}


class TestNFTEvenGridContract(OptimizerContract):
    component = "nft"
    options = {"discrete_grid": "even", "num_times": 5}
