"""Public test helpers for plugin authors: contract suites and tiny builders.

    from flowfactory.testing import PolicyContract

    class TestMyPolicyContract(PolicyContract):
        component = "my-policy"
        options = {"preset": "tiny"}

The suites need pytest and torch; they are imported on first use, so `flowfactory.testing.plugin` (the
`toy` policy's registration) stays as light as any entry-point module.
"""

from __future__ import annotations

from typing import Any

_CONTRACTS = ("PolicyContract", "SamplerContract", "RewardContract", "OptimizerContract",
              "load_registry", "make_generators", "max_abs_diff")

__all__ = [*_CONTRACTS, "ToyPolicy"]


def __getattr__(name: str) -> Any:
    if name in _CONTRACTS:
        import sys

        import pytest

        if "flowfactory.testing.contracts" not in sys.modules:
            # Plain asserts in the suites get pytest's detailed failure messages.
            pytest.register_assert_rewrite("flowfactory.testing.contracts")
        from flowfactory.testing import contracts

        return getattr(contracts, name)
    if name == "ToyPolicy":
        from flowfactory.testing.toy import ToyPolicy

        return ToyPolicy
    raise AttributeError(f"module 'flowfactory.testing' has no attribute {name!r}")
