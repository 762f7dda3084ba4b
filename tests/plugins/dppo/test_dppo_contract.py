"""flowfactory's optimizer contract suite, run on dppo with both KL normalisations and with the reference KL."""

from __future__ import annotations

from flowfactory.testing import OptimizerContract


class TestDPPOContract(OptimizerContract):
    component = "dppo"
    options = {}


class TestDPPOUnnormalisedWithKLContract(OptimizerContract):
    component = "dppo"
    options = {"kl_threshold": 0.0, "kl_normalization": "none", "kl_beta": 0.04}
