"""The registry: registration checks, lookups, summaries, ordering and the "did you mean" message."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flowfactory.errors import AmbiguousComponentError, PluginError, UnknownComponentError
from flowfactory.registry import KINDS, BuildContext, NoOptions, Registry


class QualityOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    quality: int = Field(90, ge=1, le=100)


def build(options: Any, ctx: BuildContext) -> tuple[Any, BuildContext]:
    return options, ctx


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    rewards = reg.registrar("reward", "pkg-rewards", "1.2")
    rewards("brightness", build, summary="Mean luma.")
    rewards("colour-match", build, options=QualityOptions, summary="  Colour share.\n  More detail here.  ")
    reg.registrar("sampler", "pkg-samplers", "0.3")("ode", build)
    return reg


def test_get_returns_the_spec_with_package_version_and_first_summary_line(registry: Registry) -> None:
    spec = registry.get("reward", "colour-match")
    assert (spec.kind, spec.name, spec.package, spec.version) == ("reward", "colour-match", "pkg-rewards", "1.2")
    assert spec.summary == "Colour share."
    assert spec.options is QualityOptions
    ode = registry.get("sampler", "ode")
    assert (ode.summary, ode.options, ode.package) == ("", NoOptions, "pkg-samplers")


def test_blank_summary_is_empty_not_an_error() -> None:
    reg = Registry()
    reg.registrar("reward", "p", "1")("blank", build, summary="   \n  ")
    assert reg.get("reward", "blank").summary == ""


def test_names_and_specs_are_sorted_by_kind_then_name(registry: Registry) -> None:
    assert registry.names("reward") == ["brightness", "colour-match"]
    assert registry.names("policy") == []
    assert [(s.kind, s.name) for s in registry.specs()] == [
        ("sampler", "ode"), ("reward", "brightness"), ("reward", "colour-match")]
    assert [s.name for s in registry.specs("reward")] == ["brightness", "colour-match"]
    assert KINDS == ("policy", "sampler", "reward", "optimizer")


def test_options_are_validated_by_the_component_model_and_passed_to_build(registry: Registry) -> None:
    spec = registry.get("reward", "colour-match")
    assert spec.validate_options(None) == QualityOptions(quality=90)
    options, ctx = spec.create({"quality": 50}, BuildContext(seed=7))
    assert options == QualityOptions(quality=50)
    assert ctx.seed == 7
    ready = QualityOptions(quality=10)
    assert spec.create(ready)[0] is ready  # an already validated model is used as is
    assert spec.create(None)[1] == BuildContext()
    with pytest.raises(ValidationError):
        spec.validate_options({"quality": 0})
    with pytest.raises(ValidationError):
        registry.get("reward", "brightness").validate_options({"anything": 1})  # NoOptions forbids keys


def test_unknown_name_suggests_the_closest_installed_name(registry: Registry) -> None:
    with pytest.raises(UnknownComponentError) as info:
        registry.get("reward", "brightnes")
    assert str(info.value) == (
        "no reward named 'brightnes' is installed. Did you mean 'brightness'? "
        "Installed rewards: brightness, colour-match. `ff list reward` shows them; "
        "a missing one may need its package installed.")


def test_unknown_name_without_close_match_lists_what_is_installed(registry: Registry) -> None:
    assert registry.unknown_message("reward", "pickscore") == (
        "no reward named 'pickscore' is installed. Installed rewards: brightness, colour-match. "
        "`ff list reward` shows them; a missing one may need its package installed.")
    assert registry.unknown_message("policy", "flux") == (
        "no policy named 'flux' is installed. Installed policies: none. "
        "`ff list policy` shows them; a missing one may need its package installed.")


@pytest.mark.parametrize("call", [lambda r: r.get("rewardz", "x"), lambda r: r.names("rewardz"),
                                  lambda r: r.specs("rewardz")])
def test_unknown_kind_is_a_user_error(registry: Registry, call) -> None:
    with pytest.raises(UnknownComponentError, match=r"^unknown component kind 'rewardz'; kinds are policy, sampler, "
                                                    r"reward, optimizer$"):
        call(registry)


def test_duplicate_names_the_two_packages(registry: Registry) -> None:
    with pytest.raises(PluginError) as info:
        registry.registrar("reward", "pkg-other", "9")("brightness", build)
    assert str(info.value) == (
        "reward 'brightness' is registered twice: by pkg-rewards and by pkg-other. "
        "Uninstall one of them, or rename the component in one package.")
    assert registry.get("reward", "brightness").package == "pkg-rewards"  # the first one stays


def test_the_same_name_under_two_kinds_is_fine(registry: Registry) -> None:
    registry.registrar("optimizer", "pkg-opt", "1")("ode", build)
    assert registry.get("optimizer", "ode").package == "pkg-opt"
    assert registry.get("sampler", "ode").package == "pkg-samplers"


@pytest.mark.parametrize(("name", "build_fn", "options", "message", "fix"), [
    ("", build, None, "pkg: a reward was registered without a name", "pass the name a config selects"),
    ("x", "not callable", None, "pkg: reward 'x' was registered with a build that is not callable",
     "pass a function build(options, ctx)"),
    ("x", build, dict, "pkg: reward 'x' options must be a pydantic model class, not dict", "options=Options"),
    ("x", build, QualityOptions(), "pkg: reward 'x' options must be a pydantic model class, not QualityOptions",
     "(the class, not an instance)"),
])
def test_bad_registrations_name_the_package_the_line_and_the_fix(name: str, build_fn: Any, options: Any,
                                                                 message: str, fix: str) -> None:
    register = Registry().registrar("reward", "pkg", "1")
    line = sys._getframe().f_lineno + 2  # the `register(...)` call's line
    with pytest.raises(PluginError) as info:
        register(name, build_fn, options=options)
    assert str(info.value).startswith(f"{message} (at {__file__}:{line}); ")
    assert fix in str(info.value)


def test_commit_adds_all_or_none_and_marks_a_clash_contested(registry: Registry) -> None:
    staged: list = []
    register = registry.registrar("reward", "pkg-late", "2.0", into=staged)
    register("late-only", build)
    register("brightness", build)
    assert registry.names("reward") == ["brightness", "colour-match"]  # staged, not added yet
    [clash] = registry.commit(staged)
    assert clash.startswith(f"reward 'brightness' (registered at {__file__}:")
    kept = registry.get("reward", "brightness", contested_ok=True)
    assert clash.endswith(f") is already registered by pkg-rewards 1.2 (at {kept.where})")
    assert kept.where.startswith(f"{__file__}:")  # the fixture's register(...) line
    assert registry.names("reward") == ["brightness", "colour-match"]  # late-only left out with its package
    assert registry.contested("reward", "brightness") == ["pkg-rewards 1.2", "pkg-late 2.0"]
    assert registry.contested("reward", "colour-match") == []
    with pytest.raises(AmbiguousComponentError) as info:
        registry.get("reward", "brightness")
    assert isinstance(info.value, UnknownComponentError)  # a config reports it at the component's `name`
    assert str(info.value) == (
        "reward 'brightness' is registered by more than one package: pkg-rewards 1.2 and pkg-late 2.0. A config "
        "naming it could mean either, so it is refused. Uninstall one of them (e.g. `pip uninstall pkg-late`), or "
        "rename the component in one package; `ff plugins` shows both.")
    assert registry.get("reward", "brightness", contested_ok=True).package == "pkg-rewards"  # the first kept
    staged = []
    registry.registrar("reward", "pkg-fine", "1", into=staged)("fine", build)
    assert registry.commit(staged) == [] and registry.get("reward", "fine").package == "pkg-fine"


def test_one_package_registering_a_name_twice_is_refused_at_the_second_call() -> None:
    register = Registry().registrar("reward", "pkg", "1", into=[])
    register("twice", build)
    with pytest.raises(PluginError, match=r"^pkg: reward 'twice' is registered twice by this package \(at .*"
                                          r"test_registry.py:\d+ and at .*test_registry.py:\d+\); remove one"):
        register("twice", build)


def test_unknown_message_names_packages_that_failed_to_load(registry: Registry) -> None:
    registry.failed_packages = ["flowfactory-broken"]
    assert registry.unknown_message("reward", "pickscore").endswith(
        "These plugin packages failed to load: flowfactory-broken (`ff plugins` shows why).")


def test_unknown_kind_in_a_registrar_is_refused() -> None:
    with pytest.raises(PluginError, match="unknown component kind 'model'"):
        Registry().registrar("model", "pkg", "1")("x", build)
