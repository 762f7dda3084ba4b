"""`DiffusersPolicyContract`, the pytest suite a diffusers-based policy plugin subclasses (see `.suite`), and its
helpers. Importing this package registers the suite and the core contracts it builds on for pytest's assertion
rewriting first, so their plain asserts fail with pytest's detailed messages."""

from __future__ import annotations

import sys

import pytest

_REWRITTEN = ("flowfactory.testing.contracts", "flowfactory_diffusers.testing.suite")
_fresh = [m for m in _REWRITTEN if m not in sys.modules]
if _fresh:
    pytest.register_assert_rewrite(*_fresh)

from flowfactory_diffusers.testing.suite import (  # noqa: E402  (after the rewrite registration, on purpose)
    COMMON_BAD_OPTIONS,
    HEAVY_MODULES,
    DiffusersPolicyContract,
    lora_params,
    perturb,
    velocity_loss,
)

__all__ = ["COMMON_BAD_OPTIONS", "HEAVY_MODULES", "DiffusersPolicyContract", "lora_params", "perturb",
           "velocity_loss"]
