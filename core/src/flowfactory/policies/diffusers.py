"""Deprecated alias of `flowfactory_diffusers.policy` (package flowfactory-diffusers); removed in flowfactory 0.2."""

import sys

from flowfactory._moved import moved

sys.modules[__name__] = moved(__name__, "flowfactory_diffusers.policy", "flowfactory-diffusers")
