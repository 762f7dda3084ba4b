"""The registry: kind -> name -> component spec.

Plugins never touch it directly; they call the `register` callback their hook receives, and the core
records which distribution (and version) provided each component.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from flowfactory.errors import PluginError, UnknownComponentError

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

    def validate_options(self, raw: dict[str, Any] | None) -> BaseModel:
        return self.options.model_validate(raw or {})

    def create(self, raw_options: dict[str, Any] | BaseModel | None, ctx: BuildContext | None = None) -> Any:
        opts = raw_options if isinstance(raw_options, BaseModel) else self.validate_options(raw_options)
        return self.build(opts, ctx or BuildContext())


class Registry:
    def __init__(self) -> None:
        self._specs: dict[str, dict[str, ComponentSpec]] = {k: {} for k in KINDS}

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

    def registrar(self, kind: str, package: str, version: str) -> Callable[..., None]:
        """The `register(name, build, *, options=..., summary=..., plan=None)` callback handed to a hook.

        `plan` (policies only): `plan(options, ctx) -> flowfactory.plan.PolicyPlan`, the policy's modules and
        per-sample shapes built without weights, for `ff plan`."""

        def register(
            name: str,
            build: Callable[[Any, BuildContext], Any],
            *,
            options: type[BaseModel] | None = None,
            summary: str = "",
            plan: Callable[[Any, BuildContext], Any] | None = None,
        ) -> None:
            if not isinstance(name, str) or not name:
                raise PluginError(f"{package}: a {kind} was registered without a name")
            if not callable(build):
                raise PluginError(f"{package}: {kind} {name!r} was registered with a build that is not callable")
            opts = options or NoOptions
            if not (isinstance(opts, type) and issubclass(opts, BaseModel)):
                raise PluginError(f"{package}: {kind} {name!r} options must be a pydantic model class")
            if plan is not None and (kind != "policy" or not callable(plan)):
                raise PluginError(f"{package}: {kind} {name!r}: `plan=` takes a callable and applies to policies only")
            first_line = (summary.strip().splitlines() or [""])[0] if summary else ""
            self.add(ComponentSpec(kind, name, build, opts, first_line, package, version, plan))

        return register

    def _kind(self, kind: str) -> dict[str, ComponentSpec]:
        specs = self._specs.get(kind)
        if specs is None:
            raise UnknownComponentError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
        return specs

    def get(self, kind: str, name: str) -> ComponentSpec:
        specs = self._kind(kind)
        if name in specs:
            return specs[name]
        raise UnknownComponentError(self.unknown_message(kind, name))

    def unknown_message(self, kind: str, name: str) -> str:
        names = sorted(self._specs.get(kind, {}))
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        installed = ", ".join(names) if names else "none"
        return (f"no {kind} named {name!r} is installed.{hint} Installed {KIND_PLURALS.get(kind, kind + 's')}: "
                f"{installed}. "
                f"`ff list {kind}` shows them; a missing one may need its package installed.")

    def names(self, kind: str) -> list[str]:
        return sorted(self._kind(kind))

    def specs(self, kind: str | None = None) -> list[ComponentSpec]:
        kinds = [kind] if kind else list(KINDS)
        return [spec for k in kinds for _, spec in sorted(self._kind(k).items())]
