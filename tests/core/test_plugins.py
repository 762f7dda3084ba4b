"""The plugin manager: built-ins, inline plugins, broken entry points, strict mode, duplicates, hook typos."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import flowfactory
import flowfactory.plugins as ff_plugins
from flowfactory import hookimpl
from flowfactory.errors import PluginError

TEST_PACKAGE, TEST_VERSION = "test-plugins", "1.0"  # what the `make_state` fixture registers inline plugins as


def build_component(options: Any, ctx: Any) -> tuple[Any, Any]:
    return options, ctx


class RewardPlugin:
    """Registers one reward under a name given at construction."""

    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def register_rewards(self, register: Callable[..., Any]) -> None:
        register(self.name, build_component, summary=f"reward {self.name}")


def _broken() -> Any:
    raise ImportError("No module named 'missing_dependency'")


def test_builtins_are_registered_by_package_flowfactory(make_state) -> None:
    state = make_state()
    reg = state.registry
    assert {"ode", "flow-sde"} <= set(reg.names("sampler"))
    assert {"brightness", "colour-match", "jpeg-compressibility", "jpeg-incompressibility"} <= set(
        reg.names("reward"))
    for spec in reg.specs("sampler") + reg.specs("reward"):
        assert (spec.package, spec.version) == ("flowfactory", flowfactory.__version__)
    builtins = {p.name: p for p in state.plugins if p.package == "flowfactory"}
    assert builtins["flowfactory.samplers"].hooks == ["register_samplers"]
    assert builtins["flowfactory.rewards"].hooks == ["register_rewards"]
    assert all(p.error is None for p in builtins.values())


def test_inline_plugin_registers_with_its_package_and_version(make_state, components_plugin) -> None:
    state = make_state(components_plugin)
    spec = state.registry.get("policy", "tiny-policy")
    assert (spec.kind, spec.name, spec.package, spec.version) == ("policy", "tiny-policy", TEST_PACKAGE, TEST_VERSION)
    assert spec.summary == "A tiny test policy."
    assert state.registry.get("optimizer", "fake-opt").package == TEST_PACKAGE
    info = state.plugins[-1]
    assert (info.name, info.package, info.version) == ("ComponentsPlugin", TEST_PACKAGE, TEST_VERSION)
    assert info.hooks == ["register_optimizers", "register_policies"]
    assert info.error is None
    assert state.info_for(f"{TEST_PACKAGE}:ComponentsPlugin") is info
    assert state.info_for("nobody:nothing") is None


def test_entry_points_are_loaded_with_their_distribution(make_state, fake_entry_points) -> None:
    fake_entry_points(("good", "flowfactory-good", "2.3", lambda: RewardPlugin("good-reward")),
                      ("bare", None, "?", lambda: RewardPlugin("bare-reward")))
    state = ff_plugins.load(strict=True)
    good = state.registry.get("reward", "good-reward")
    assert (good.package, good.version) == ("flowfactory-good", "2.3")
    bare = state.registry.get("reward", "bare-reward")
    assert (bare.package, bare.version) == ("bare_module", "?")  # no dist: the module name stands in
    infos = {p.name: p for p in state.plugins}
    assert infos["good"].hooks == ["register_rewards"]
    assert infos["good"].error is None


def test_broken_entry_point_is_isolated_and_recorded(fake_entry_points) -> None:
    fake_entry_points(("broken", "flowfactory-broken", "0.9", _broken),
                      ("good", "flowfactory-good", "2.3", lambda: RewardPlugin("good-reward")))
    state = ff_plugins.load(strict=False)
    assert state.registry.get("reward", "good-reward").package == "flowfactory-good"
    broken = next(p for p in state.plugins if p.name == "broken")
    assert (broken.package, broken.version) == ("flowfactory-broken", "0.9")
    assert broken.error == "ImportError: No module named 'missing_dependency'"
    assert broken.hooks == []
    assert state.errors == [broken]


def test_strict_mode_raises_naming_the_package(fake_entry_points) -> None:
    fake_entry_points(("broken", "flowfactory-broken", "0.9", _broken))
    with pytest.raises(PluginError) as info:
        ff_plugins.load(strict=True)
    msg = str(info.value)
    assert msg.startswith("plugin 'broken' from flowfactory-broken 0.9 failed to load: "
                          "ImportError: No module named 'missing_dependency' (at ")
    assert "test_plugins.py:" in msg  # where the import failed
    assert msg.endswith("Fix or uninstall that package (FLOWFACTORY_STRICT_PLUGINS=1 makes this an error).")
    assert "Traceback" not in msg
    assert isinstance(info.value.__cause__, ImportError)


@pytest.mark.parametrize(("value", "strict"), [("1", True), ("true", True), ("yes", True), ("0", False),
                                               ("", False)])
def test_strict_follows_the_environment(monkeypatch, fake_entry_points, value: str, strict: bool) -> None:
    monkeypatch.setenv("FLOWFACTORY_STRICT_PLUGINS", value)
    assert ff_plugins.strict_default() is strict
    fake_entry_points(("broken", "flowfactory-broken", "0.9", _broken))
    if strict:
        with pytest.raises(PluginError, match="flowfactory-broken"):
            ff_plugins.load()
    else:
        assert ff_plugins.load().errors[0].package == "flowfactory-broken"


def test_same_kind_and_name_from_two_packages_is_an_error(make_state) -> None:
    with pytest.raises(PluginError) as info:
        make_state((RewardPlugin("dup"), "pkg-a", "1"), (RewardPlugin("dup"), "pkg-b", "1"), strict=False)
    msg = str(info.value)
    assert "reward 'dup' is registered twice" in msg
    assert "pkg-a" in msg and "pkg-b" in msg
    assert "Uninstall one of them" in msg


def test_a_plugin_reusing_a_builtin_name_is_an_error(make_state) -> None:
    with pytest.raises(PluginError, match=r"reward 'brightness' is registered twice: by \S+ and by \S+") as info:
        make_state((RewardPlugin("brightness"), "flowfactory-shiny", "1"))
    assert {"flowfactory", "flowfactory-shiny"} <= set(str(info.value).replace(".", " ").split())


class Misspelled:
    @hookimpl
    def register_polices(self, register: Callable[..., Any]) -> None:  # typo of register_policies
        register("never", build_component)


def test_misspelled_hook_is_an_error_naming_the_plugin(make_state) -> None:
    with pytest.raises(PluginError) as info:
        make_state((Misspelled(), "flowfactory-typo", "0.1"), strict=False)
    msg = str(info.value)
    assert msg.startswith("plugin 'Misspelled' from flowfactory-typo 0.1 implements unknown hook "
                          "'register_polices' (did you mean 'register_policies'?).")
    assert "register_commands, register_optimizers, register_policies, register_rewards, register_samplers" in msg


class RaisingHook:
    @hookimpl
    def register_rewards(self, register: Callable[..., Any]) -> None:
        register("half-done", build_component)
        raise RuntimeError("boom")


def test_a_raising_register_hook_is_recorded_or_strict_error(make_state, components_plugin) -> None:
    state = make_state((RaisingHook(), "flowfactory-raises", "3"), components_plugin, strict=False)
    info = next(p for p in state.plugins if p.package == "flowfactory-raises")
    assert info.error == "register_rewards raised RuntimeError: boom"
    assert state.registry.get("policy", "tiny-policy").package == TEST_PACKAGE  # the others still register
    with pytest.raises(PluginError, match=r"^flowfactory-raises: register_rewards raised RuntimeError: boom$"):
        make_state((RaisingHook(), "flowfactory-raises", "3"), strict=True)


def test_get_state_loads_once_and_reset_forgets(monkeypatch, fake_entry_points) -> None:
    fake_entry_points(("good", "flowfactory-good", "2.3", lambda: RewardPlugin("good-reward")))
    monkeypatch.setattr(ff_plugins, "_STATE", None)
    first = ff_plugins.get_state()
    assert ff_plugins.get_state() is first
    assert ff_plugins.get_registry() is first.registry
    assert first.registry.get("reward", "good-reward").package == "flowfactory-good"
    ff_plugins.reset()
    assert ff_plugins.get_state() is not first
