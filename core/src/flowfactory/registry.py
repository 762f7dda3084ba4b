"""The registry: kind -> name -> component spec.

Plugins never touch it directly; they call the `register` callback their hook receives, and the core
records which distribution (and version) provided each component.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from flowfactory.errors import AmbiguousComponentError, PluginError, UnknownComponentError
from flowfactory.hookspecs import Register

__all__ = ["KINDS", "BuildContext", "ComponentSpec", "NoOptions", "Register", "Registry"]

KINDS: tuple[str, ...] = ("policy", "sampler", "reward", "optimizer")
KIND_PLURALS: dict[str, str] = {
    "policy": "policies", "sampler": "samplers", "reward": "rewards", "optimizer": "optimizers"}
HOOK_FOR_KIND: dict[str, str] = {
    "policy": "register_policies",
    "sampler": "register_samplers",
    "reward": "register_rewards",
    "optimizer": "register_optimizers",
}


class NoOptions(BaseModel):
    """Options model of a component that takes none."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class BuildContext:
    """What a build function may use besides its options."""

    seed: int = 0
    device: Any = None  # torch.device, or None for CPU
    dtype: Any = None  # torch dtype of frozen weights, or None for the component's default
    output_dir: str | None = None
    reference: bool = True  # the run uses the policy's reference view; False: a full finetune keeps no frozen copy
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ComponentSpec:
    kind: str
    name: str
    build: Callable[[Any, BuildContext], Any]
    options: type[BaseModel]
    summary: str
    package: str
    version: str
    plan: Callable[[Any, BuildContext], Any] | None = None  # policies: options, ctx -> flowfactory.plan.PolicyPlan
    where: str = ""  # file:line of the `register(...)` call that added it

    def validate_options(self, raw: dict[str, Any] | None) -> BaseModel:
        return self.options.model_validate(raw or {})

    def create(self, raw_options: dict[str, Any] | BaseModel | None, ctx: BuildContext | None = None) -> Any:
        opts = raw_options if isinstance(raw_options, BaseModel) else self.validate_options(raw_options)
        return self.build(opts, ctx or BuildContext())


def _caller(depth: int = 2) -> str:
    """file:line of the code that called the function calling this one (a plugin's `register(...)` line)."""
    frame = sys._getframe(depth)
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


class Registry:
    def __init__(self) -> None:
        self._specs: dict[str, dict[str, ComponentSpec]] = {k: {} for k in KINDS}
        # (kind, name) -> "package version" of each package that registered it, the kept one first
        self._contested: dict[tuple[str, str], list[str]] = {}
        self.failed_packages: list[str] = []  # packages whose plugin failed to load (named by unknown_message)

    def add(self, spec: ComponentSpec) -> None:
        if spec.kind not in self._specs:
            raise PluginError(f"unknown component kind {spec.kind!r}; kinds are {', '.join(KINDS)}")
        existing = self._specs[spec.kind].get(spec.name)
        if existing is not None:
            raise PluginError(
                f"{spec.kind} {spec.name!r} is registered twice: by {existing.package} and by {spec.package}. "
                f"Uninstall one of them, or rename the component in one package."
            )
        self._specs[spec.kind][spec.name] = spec

    def commit(self, specs: list[ComponentSpec]) -> list[str]:
        """Add one plugin's components, all or none: when any of them takes a kind+name another package
        already registered, none is added, the name is marked contested (a config naming it is refused by
        `get`) and one message per clash is returned."""
        clashes = [(s, self._specs[s.kind][s.name]) for s in specs if s.name in self._specs[s.kind]]
        if not clashes:
            for spec in specs:
                self.add(spec)
            return []
        messages = []
        for spec, kept in clashes:
            self._contested.setdefault((spec.kind, spec.name), [f"{kept.package} {kept.version}"]).append(
                f"{spec.package} {spec.version}")
            messages.append(f"{spec.kind} {spec.name!r} (registered at {spec.where}) is already registered by "
                            f"{kept.package} {kept.version}" + (f" (at {kept.where})" if kept.where else ""))
        return messages

    def contested(self, kind: str, name: str) -> list[str]:
        """'package version' of every package that registered kind+name when more than one did, else []."""
        return list(self._contested.get((kind, name), []))

    def registrar(self, kind: str, package: str, version: str,
                  into: list[ComponentSpec] | None = None) -> Register:
        """The `register(name, build, *, options=..., summary=..., plan=None)` callback handed to a hook
        (`flowfactory.Register`).

        `plan` (policies only): `plan(options, ctx) -> flowfactory.plan.PolicyPlan`, the policy's modules and
        per-sample shapes built without weights, for `ff plan`. `into`: collect the specs there (to `commit`
        them later, all or none) instead of adding them now. Each error names the `register(...)` call."""

        def register(
            name: str,
            build: Callable[[Any, BuildContext], Any],
            *,
            options: type[BaseModel] | None = None,
            summary: str = "",
            plan: Callable[[Any, BuildContext], Any] | None = None,
        ) -> None:
            where = _caller()
            if not isinstance(name, str) or not name:
                raise PluginError(f"{package}: a {kind} was registered without a name (at {where}); "
                                  f"pass the name a config selects as the first argument")
            if not callable(build):
                raise PluginError(f"{package}: {kind} {name!r} was registered with a build that is not callable "
                                  f"(at {where}); pass a function build(options, ctx) -> component")
            opts = options or NoOptions
            if not (isinstance(opts, type) and issubclass(opts, BaseModel)):
                got = type(opts).__name__ if not isinstance(opts, type) else opts.__name__
                raise PluginError(f"{package}: {kind} {name!r} options must be a pydantic model class, not {got} "
                                  f"(at {where}); declare `class Options(pydantic.BaseModel)` and pass "
                                  "options=Options (the class, not an instance)")
            if plan is not None and (kind != "policy" or not callable(plan)):
                raise PluginError(f"{package}: {kind} {name!r}: `plan=` takes a callable and applies to policies "
                                  f"only (at {where})")
            first_line = (summary.strip().splitlines() or [""])[0] if summary else ""
            spec = ComponentSpec(kind, name, build, opts, first_line, package, version, plan, where)
            if into is None:
                self.add(spec)
                return
            if kind not in self._specs:
                raise PluginError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
            twice = next((s for s in into if (s.kind, s.name) == (kind, name)), None)
            if twice is not None:
                raise PluginError(f"{package}: {kind} {name!r} is registered twice by this package (at {twice.where} "
                                  f"and at {where}); remove one of the calls")
            into.append(spec)

        return register

    def _kind(self, kind: str) -> dict[str, ComponentSpec]:
        specs = self._specs.get(kind)
        if specs is None:
            raise UnknownComponentError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
        return specs

    def get(self, kind: str, name: str, *, contested_ok: bool = False) -> ComponentSpec:
        """The component `kind` `name`. A name that two packages registered is refused (a config naming it
        could get either); contested_ok=True returns the one kept, the first loaded (`ff show`)."""
        specs = self._kind(kind)
        if name in specs:
            if not contested_ok and (kind, name) in self._contested:
                raise AmbiguousComponentError(self.contested_message(kind, name))
            return specs[name]
        raise UnknownComponentError(self.unknown_message(kind, name))

    def contested_message(self, kind: str, name: str) -> str:
        packages = self._contested[(kind, name)]
        others = [p.split()[0] for p in packages[1:]]
        return (f"{kind} {name!r} is registered by more than one package: {' and '.join(packages)}. "
                f"A config naming it could mean either, so it is refused. Uninstall one of them "
                f"(e.g. `pip uninstall {' '.join(others)}`), or rename the component in one package; "
                "`ff plugins` shows both.")

    def unknown_message(self, kind: str, name: str) -> str:
        names = sorted(self._specs.get(kind, {}))
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        installed = ", ".join(names) if names else "none"
        return (f"no {kind} named {name!r} is installed.{hint} Installed {KIND_PLURALS.get(kind, kind + 's')}: "
                f"{installed}. "
                f"`ff list {kind}` shows them; a missing one may need its package installed."
                + (f" These plugin packages failed to load: {', '.join(self.failed_packages)} "
                   "(`ff plugins` shows why)." if self.failed_packages else ""))

    def names(self, kind: str) -> list[str]:
        return sorted(self._kind(kind))

    def specs(self, kind: str | None = None) -> list[ComponentSpec]:
        kinds = [kind] if kind else list(KINDS)
        return [spec for k in kinds for _, spec in sorted(self._kind(k).items())]
