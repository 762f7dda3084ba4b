"""Hook specifications: one per component kind, plus CLI commands.

Each `register_*` hook receives a `register` callback, typed `flowfactory.Register`:
    register(name, build, *, options=<pydantic model class>, summary="one line", plan=None)
`build(options, ctx)` returns the component; `options` is an instance of the options model and `ctx` a
`flowfactory.registry.BuildContext`.

This module imports only pluggy and typing (the types in annotations are never imported at run time), so an
entry-point module can import `flowfactory.Register` for free.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    import typer
    from pydantic import BaseModel

    from flowfactory.plan import PolicyPlan
    from flowfactory.registry import BuildContext

hookspec = pluggy.HookspecMarker("flowfactory")
hookimpl = pluggy.HookimplMarker("flowfactory")


class Register(Protocol):
    """The `register` callback a `register_*` hook receives; annotate your hook with it:

        from flowfactory import Register, hookimpl

        @hookimpl
        def register_rewards(register: Register) -> None:
            register("redness", build, options=RednessOptions, summary="Red minus the other channels.")
    """

    def __call__(
        self,
        name: str,
        build: Callable[[Any, BuildContext], Any],
        *,
        options: type[BaseModel] | None = None,
        summary: str = "",
        plan: Callable[[Any, BuildContext], PolicyPlan] | None = None,
    ) -> None:
        """Add a component of the hook's kind.

        :param name: what a config's `name:` selects; unique per kind across all installed packages.
        :param build: `build(options, ctx)` returns the component; called only when a run starts, so heavy
            imports belong inside it.
        :param options: the pydantic model a config's `options:` is validated against (the class); None:
            the component takes no options.
        :param summary: one line for `ff list` (only the first line is kept).
        :param plan: policies only: `plan(options, ctx) -> PolicyPlan`, the modules and shapes `ff plan`
            sizes, built without weights.
        """


@hookspec
def register_policies(register: Register) -> None:
    """Register trainable flow-matching models (the `Policy` protocol)."""


@hookspec
def register_samplers(register: Register) -> None:
    """Register rollout samplers: ODE/SDE integrators with log-probabilities (the `Sampler` protocol)."""


@hookspec
def register_rewards(register: Register) -> None:
    """Register reward models that score decoded samples (the `Reward` protocol)."""


@hookspec
def register_optimizers(register: Register) -> None:
    """Register policy optimizers: the RL algorithms such as GRPO (the `PolicyOptimizer` protocol)."""


@hookspec
def register_commands(app: typer.Typer) -> None:
    """Add subcommands to the `ff` Typer application."""
