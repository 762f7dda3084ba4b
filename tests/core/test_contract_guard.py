"""The contract suites for plugin authors: a subclass cannot silently override or delete a contract test
(`test_no_overrides`), and installed plugins load leniently, so another package's broken plugin does not fail
an author's own tests."""

from __future__ import annotations

from typing import Any

import pytest

from flowfactory import hookimpl
from flowfactory.errors import PluginError, UnknownComponentError
from flowfactory.testing import RewardContract, SamplerContract, load_registry, override_contract
from flowfactory.testing.contracts import contract_overrides


def _guard_message(cls: type) -> str:
    with pytest.raises(AssertionError) as info:
        cls().test_no_overrides()
    return str(info.value)


def test_an_unmarked_override_fails_the_guard_naming_the_method() -> None:
    class LaxReward(RewardContract):
        component = "brightness"

        def test_scores_depend_on_the_images(self, reward: Any) -> None:
            pass  # "passes" whatever the reward does

    message = _guard_message(LaxReward)
    assert message.startswith(
        "test_an_unmarked_override_fails_the_guard_naming_the_method.<locals>.LaxReward.test_scores_depend_on_the_"
        "images overrides the contract test RewardContract.test_scores_depend_on_the_images. A component that "
        "cannot meet it should say why: decorate the override with "
        '@flowfactory.testing.override_contract("reason")')


def test_deleting_a_contract_test_fails_the_guard() -> None:
    class Base(SamplerContract):  # a plugin's own shared base class, between the suite and the test class
        test_log_prob_has_gradient = None

    class TestMySampler(Base):
        component = "ode"

    assert contract_overrides(TestMySampler) == [
        "test_deleting_a_contract_test_fails_the_guard.<locals>.Base.test_log_prob_has_gradient deletes (sets it to "
        "None) the contract test SamplerContract.test_log_prob_has_gradient. A component that cannot meet it should "
        'say why: decorate the override with @flowfactory.testing.override_contract("reason") (call '
        "pytest.skip(reason) in it to leave the check out), or remove it."]


def test_a_marked_override_and_new_tests_pass_the_guard() -> None:
    class TestGroupReward(RewardContract):
        component = "brightness"

        @override_contract("scores whole groups: rows depend on each other by design")
        def test_scores_do_not_depend_on_other_rows(self, reward: Any) -> None:
            pytest.skip("groupwise reward")

        def test_something_of_its_own(self) -> None:
            pass

    assert contract_overrides(TestGroupReward) == []
    TestGroupReward().test_no_overrides()


def test_override_contract_needs_a_reason() -> None:
    with pytest.raises(TypeError, match=r'^override_contract needs a reason: @override_contract\("why'):
        override_contract("  ")
    with pytest.raises(TypeError, match="needs a reason"):
        @override_contract  # used without its reason: the function arrives as the reason
        def test_x() -> None:
            pass


def test_the_guard_itself_cannot_be_redefined() -> None:
    with pytest.raises(TypeError, match=r"redefines test_no_overrides, the guard of the contract suite; remove it"):
        class TestSneaky(RewardContract):
            component = "brightness"

            def test_no_overrides(self) -> None:
                pass


def _broken() -> Any:
    raise ImportError("No module named 'flash_attn'")


def test_installed_plugins_load_leniently_so_a_broken_one_does_not_fail_the_suite(fake_entry_points) -> None:
    fake_entry_points(("broken", "flowfactory-unrelated", "0.1", _broken))
    registry = load_registry()  # FLOWFACTORY_STRICT_PLUGINS=1 is set for this session: the suites ignore it
    assert registry.get("policy", "toy").package == "flowfactory-testing"
    with pytest.raises(UnknownComponentError, match=r"These plugin packages failed to load: flowfactory-unrelated "
                                                    r"\(`ff plugins` shows why\)\.$"):
        registry.get("reward", "my-reward")  # the author's component, had it been in the broken package
    with pytest.raises(PluginError, match="flowfactory-unrelated"):
        load_registry(strict=True)


class BadInline:
    @hookimpl
    def register_reward(self, register: Any) -> None:  # misspelled
        pass


def test_a_suites_own_inline_plugin_is_still_checked_strictly() -> None:
    with pytest.raises(PluginError, match=r"^inline plugin 'BadInline' \(pkg-inline\): implements unknown hook "
                                          r"'register_reward' \(did you mean 'register_rewards'\?\)"):
        load_registry([(BadInline(), "pkg-inline", "1")], entry_points=False)
