"""The plugin manager: built-ins, inline plugins, broken entry points, strict mode, duplicates, hook typos."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import flowfactory
import flowfactory.plugins as ff_plugins
from flowfactory import hookimpl
from flowfactory.errors import PluginError, UnknownComponentError

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


BROKEN_LINE = _broken.__code__.co_firstlineno + 1  # the `raise` in _broken


def test_broken_entry_point_is_isolated_and_recorded(fake_entry_points) -> None:
    fake_entry_points(("broken", "flowfactory-broken", "0.9", _broken),
                      ("good", "flowfactory-good", "2.3", lambda: RewardPlugin("good-reward")))
    state = ff_plugins.load(strict=False)
    assert state.registry.get("reward", "good-reward").package == "flowfactory-good"
    broken = next(p for p in state.plugins if p.name == "broken")
    assert (broken.package, broken.version) == ("flowfactory-broken", "0.9")
    assert broken.error == f"ImportError: No module named 'missing_dependency' (at {__file__}:{BROKEN_LINE})"
    assert broken.entry_point == "broken = broken_module"
    assert broken.hooks == []
    assert state.errors == [broken]
    assert state.registry.failed_packages == ["flowfactory-broken"]


def test_strict_mode_raises_naming_the_package_and_keeps_the_state(fake_entry_points) -> None:
    fake_entry_points(("broken", "flowfactory-broken", "0.9", _broken))
    with pytest.raises(PluginError) as info:
        ff_plugins.load(strict=True)
    msg = str(info.value)
    assert msg == (f"plugin 'broken' from flowfactory-broken 0.9 failed to load: ImportError: No module named "
                   f"'missing_dependency' (at {__file__}:{BROKEN_LINE}). Fix or uninstall that package "
                   "(FLOWFACTORY_STRICT_PLUGINS=1 makes this an error; `ff plugins` lists every plugin).")
    assert isinstance(info.value.__cause__, ImportError)
    assert [p.name for p in info.value.state.errors] == ["broken"]  # what `ff plugins` shows in strict mode


def test_strict_mode_lists_every_problem_at_once(make_state) -> None:
    with pytest.raises(PluginError) as info:
        make_state((Misspelled(), "flowfactory-typo", "0.1"), (NoHooks(), "flowfactory-empty", "0.2"))
    lines = str(info.value).splitlines()
    assert lines[0] == "2 plugins have problems:"
    assert lines[1].startswith("  plugin 'Misspelled' from flowfactory-typo 0.1: implements unknown hook")
    assert lines[2].startswith("  plugin 'NoHooks' from flowfactory-empty 0.2: it implements no flowfactory hook")
    assert lines[3] == ("Fix or uninstall those packages (FLOWFACTORY_STRICT_PLUGINS=1 makes this an error; "
                        "`ff plugins` lists every plugin).")


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


class TwoRewards:
    @hookimpl
    def register_rewards(self, register: Callable[..., Any]) -> None:
        register("dup", build_component)
        register("only-b", build_component)


def test_same_kind_and_name_from_two_packages_keeps_the_first_and_skips_the_second(make_state) -> None:
    state = make_state((RewardPlugin("dup"), "pkg-a", "1"), (TwoRewards(), "pkg-b", "2"), strict=False)
    a, b = state.plugins[-2:]
    assert a.error is None
    assert b.error.startswith(f"reward 'dup' (registered at {__file__}:")
    assert ") is already registered by pkg-a 1 (at " in b.error
    assert b.error.endswith("every component of pkg-b is left out; a config naming it is refused. Uninstall one of "
                            "the two packages, or rename the component in one of them")
    assert state.registry.get("reward", "dup", contested_ok=True).package == "pkg-a"
    assert "only-b" not in state.registry.names("reward")  # the second package contributes nothing
    with pytest.raises(PluginError, match=r"reward 'dup'.* pkg-a 1 .*Uninstall one of the two packages"):
        make_state((RewardPlugin("dup"), "pkg-a", "1"), (TwoRewards(), "pkg-b", "2"), strict=True)


def test_a_plugin_reusing_a_builtin_name_is_recorded_and_the_name_refused(make_state) -> None:
    state = make_state((RewardPlugin("brightness"), "flowfactory-shiny", "1"), strict=False)
    shiny = state.plugins[-1]
    assert "reward 'brightness' (registered at " in shiny.error
    assert f"is already registered by flowfactory {flowfactory.__version__} (at " in shiny.error
    assert state.registry.contested("reward", "brightness") == [f"flowfactory {flowfactory.__version__}",
                                                                 "flowfactory-shiny 1"]
    with pytest.raises(UnknownComponentError, match=r"registered by more than one package: flowfactory \S+ and "
                                                    r"flowfactory-shiny 1\."):
        state.registry.get("reward", "brightness")


class Misspelled:
    @hookimpl
    def register_polices(self, register: Callable[..., Any]) -> None:  # typo of register_policies
        register("never", build_component)


def test_misspelled_hook_is_recorded_naming_the_hook_and_its_line(make_state) -> None:
    state = make_state((Misspelled(), "flowfactory-typo", "0.1"), strict=False)
    info = state.plugins[-1]
    line = Misspelled.register_polices.__code__.co_firstlineno
    assert info.error == (f"implements unknown hook 'register_polices' (did you mean 'register_policies'?) at "
                          f"{__file__}:{line}; check its spelling: the hooks of flowfactory are register_commands, "
                          "register_optimizers, register_policies, register_rewards, register_samplers")
    assert "never" not in state.registry.names("policy")
    assert state.pm.get_plugin("flowfactory-typo:Misspelled") is None  # never handed to pluggy


class WrongArgument:
    @hookimpl
    def register_rewards(self, registr: Callable[..., Any]) -> None:
        registr("never", build_component)


def test_a_hook_argument_the_spec_lacks_is_recorded_at_its_line(make_state) -> None:
    state = make_state((WrongArgument(), "flowfactory-arg", "0.1"), strict=False)
    line = WrongArgument.register_rewards.__code__.co_firstlineno
    assert state.plugins[-1].error == (
        f"hook register_rewards(registr) at {__file__}:{line} takes 'registr', which flowfactory does not pass; "
        "name its argument 'register' (a hook may take a subset of register_rewards(register))")


class NoHooks:
    def register_rewards(self, register: Callable[..., Any]) -> None:  # not marked @hookimpl
        register("never", build_component)


def test_a_plugin_without_hookimpl_is_a_warning(make_state) -> None:
    state = make_state((NoHooks(), "flowfactory-empty", "0.2"), strict=False)
    info = state.plugins[-1]
    assert (info.error, info.hooks) == (None, [])
    assert info.warning.startswith("it implements no flowfactory hook: nothing in ")
    assert info.warning.endswith("is marked @flowfactory.hookimpl. Mark its register_* functions with @hookimpl, "
                                 "or remove the entry point")
    assert state.problems == [info] and state.errors == []


class BadOptions:
    @hookimpl
    def register_rewards(self, register: Callable[..., Any]) -> None:
        register("fine", build_component)
        register("bad", build_component, options={"quality": 90})


def test_options_that_are_not_a_model_are_recorded_at_the_register_line(make_state) -> None:
    state = make_state((BadOptions(), "flowfactory-opts", "0.3"), strict=False)
    line = BadOptions.register_rewards.__code__.co_firstlineno + 3
    assert state.plugins[-1].error.startswith(
        f"register_rewards: reward 'bad' options must be a pydantic model class, not dict (at {__file__}:{line}); ")
    assert "fine" not in state.registry.names("reward")  # all of the plugin's components, or none


class RaisingHook:
    @hookimpl
    def register_rewards(self, register: Callable[..., Any]) -> None:
        register("half-done", build_component)
        raise RuntimeError("boom")


def test_a_raising_register_hook_is_recorded_or_strict_error(make_state, components_plugin) -> None:
    state = make_state((RaisingHook(), "flowfactory-raises", "3"), components_plugin, strict=False)
    info = next(p for p in state.plugins if p.package == "flowfactory-raises")
    line = RaisingHook.register_rewards.__code__.co_firstlineno + 3
    assert info.error == f"register_rewards raised RuntimeError: boom (at {__file__}:{line})"
    assert "half-done" not in state.registry.names("reward")
    assert state.registry.get("policy", "tiny-policy").package == TEST_PACKAGE  # the others still register
    with pytest.raises(PluginError, match=r"^plugin 'RaisingHook' from flowfactory-raises 3 failed to load: "
                                          r"register_rewards raised RuntimeError: boom \(at "):
        make_state((RaisingHook(), "flowfactory-raises", "3"), strict=True)


def test_heavy_imports_while_an_entry_point_loads_are_recorded_with_their_line(fake_entry_points) -> None:
    def load_heavy() -> Any:
        import torch  # noqa: F401  (already imported in this session: the import statement is what counts)

        return RewardPlugin("heavy-reward")

    fake_entry_points(("heavy", "flowfactory-heavy", "1", load_heavy),
                      ("light", "flowfactory-light", "1", lambda: RewardPlugin("light-reward")))
    state = ff_plugins.load(strict=True)  # slow, not broken: strict mode lets it load
    infos = {p.name: p for p in state.plugins}
    assert infos["heavy"].slow_imports == [f"torch (at {__file__}:{load_heavy.__code__.co_firstlineno + 1})"]
    assert infos["light"].slow_imports == []
    assert state.registry.get("reward", "heavy-reward").package == "flowfactory-heavy"


def test_get_state_loads_once_and_reset_forgets(monkeypatch, fake_entry_points) -> None:
    fake_entry_points(("good", "flowfactory-good", "2.3", lambda: RewardPlugin("good-reward")))
    monkeypatch.setattr(ff_plugins, "_STATE", None)
    first = ff_plugins.get_state()
    assert ff_plugins.get_state() is first
    assert ff_plugins.get_registry() is first.registry
    assert first.registry.get("reward", "good-reward").package == "flowfactory-good"
    ff_plugins.reset()
    assert ff_plugins.get_state() is not first
