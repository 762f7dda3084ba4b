"""Public test helpers for plugin authors: contract suites and tiny builders.

    from flowfactory.testing import PolicyContract

    class TestMyPolicyContract(PolicyContract):
        component = "my-policy"
        options = {"preset": "tiny"}

`DiffusersPolicyContract` (in `flowfactory.testing.diffusers`) checks a diffusers-based policy against stock
diffusers: parity with the pipeline's `__call__`, LoRA and full-finetune saves it loads, options and build errors.

The suites need pytest and torch; they are imported on first use, so `flowfactory.testing.plugin` (the
`toy` policy's registration) stays as light as any entry-point module, and diffusers only inside the tests.
"""

from __future__ import annotations

from typing import Any

_CONTRACTS = ("PolicyContract", "SamplerContract", "RewardContract", "OptimizerContract",
              "load_registry", "make_generators", "max_abs_diff")

_SUITES = {**{name: "flowfactory.testing.contracts" for name in _CONTRACTS},
           "DiffusersPolicyContract": "flowfactory.testing.diffusers"}

__all__ = [*_SUITES, "ToyPolicy"]


def __getattr__(name: str) -> Any:
    if name in _SUITES:
        import importlib
        import sys

        import pytest

        # Plain asserts in the suites get pytest's detailed failure messages (the diffusers suite builds on
        # the contracts module, so both are registered before either is imported).
        fresh = [m for m in ("flowfactory.testing.contracts", _SUITES[name]) if m not in sys.modules]
        if fresh:
            pytest.register_assert_rewrite(*fresh)
        return getattr(importlib.import_module(_SUITES[name]), name)
    if name == "ToyPolicy":
        from flowfactory.testing.toy import ToyPolicy

        return ToyPolicy
    raise AttributeError(f"module 'flowfactory.testing' has no attribute {name!r}")
