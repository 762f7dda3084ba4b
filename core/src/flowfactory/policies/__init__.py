"""Deprecated alias of `flowfactory_diffusers` (package flowfactory-diffusers), where the diffusers policy base,
its options, its `ff plan` half and `quiet_transformers` now live; removed in flowfactory 0.2."""

from flowfactory._moved import moved

quiet_transformers = moved(__name__, "flowfactory_diffusers", "flowfactory-diffusers").quiet_transformers
