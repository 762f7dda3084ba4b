"""Public test helpers for plugin authors: contract suites and tiny builders.

    from flowfactory.testing import PolicyContract

    class TestMyPolicyContract(PolicyContract):
        component = "my-policy"
        options = {"preset": "tiny"}

`DiffusersPolicyContract`, which checks a diffusers-based policy against stock diffusers, lives in the
flowfactory-diffusers package (`from flowfactory_diffusers.testing import DiffusersPolicyContract`); the name here
is a deprecated alias, removed in flowfactory 0.2.

A suite's `test_*` methods are its contract: a subclass that redefines or deletes one fails the suite's
`test_no_overrides`, unless the override is marked with `override_contract("reason")`.

The suites need pytest and torch; they are imported on first use, so `flowfactory.testing.plugin` (the
`toy` policy's registration) stays as light as any entry-point module, and diffusers only inside the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

OVERRIDE_MARK = "__flowfactory_override_contract__"  # attribute override_contract sets: the reason
_F = TypeVar("_F", bound=Callable[..., Any])


def override_contract(reason: str) -> Callable[[_F], _F]:
    """Mark a test that redefines a contract suite's test of the same name, saying why this component differs:

        class TestMyRewardContract(RewardContract):
            component = "my-reward"

            @override_contract("scores whole groups: rows depend on each other by design")
            def test_scores_do_not_depend_on_other_rows(self, reward):
                pytest.skip("groupwise reward")

    Without it the suite's `test_no_overrides` fails, naming the method.
    """
    if not isinstance(reason, str) or not reason.strip():
        raise TypeError('override_contract needs a reason: @override_contract("why this component differs")')

    def mark(function: _F) -> _F:
        setattr(function, OVERRIDE_MARK, reason)
        return function

    return mark

_CONTRACTS = ("PolicyContract", "SamplerContract", "RewardContract", "OptimizerContract",
              "load_registry", "make_generators", "max_abs_diff")

_SUITES = {name: "flowfactory.testing.contracts" for name in _CONTRACTS}

__all__ = [*_SUITES, "ToyPolicy", "override_contract"]


def __getattr__(name: str) -> Any:
    if name in _SUITES:
        import importlib
        import sys

        import pytest

        # Plain asserts in the suites get pytest's detailed failure messages.
        if _SUITES[name] not in sys.modules:
            pytest.register_assert_rewrite(_SUITES[name])
        return getattr(importlib.import_module(_SUITES[name]), name)
    if name == "DiffusersPolicyContract":  # deprecated alias: the suite moved to flowfactory-diffusers
        from flowfactory._moved import moved

        suite = moved("flowfactory.testing.DiffusersPolicyContract", "flowfactory_diffusers.testing",
                      "flowfactory-diffusers").DiffusersPolicyContract
        globals()[name] = suite  # warn once
        return suite
    if name == "ToyPolicy":
        from flowfactory.testing.toy import ToyPolicy

        return ToyPolicy
    raise AttributeError(f"module 'flowfactory.testing' has no attribute {name!r}")
