"""Hook specifications: one per component kind, plus CLI commands.

Each `register_*` hook receives a `register` callback:
    register(name, build, *, options=<pydantic model class>, summary="one line")
`build(options, ctx)` returns the component; `options` is an instance of the options model and `ctx` a
`flowfactory.registry.BuildContext`.
"""

import pluggy

hookspec = pluggy.HookspecMarker("flowfactory")
hookimpl = pluggy.HookimplMarker("flowfactory")


@hookspec
def register_policies(register):
    """Register trainable flow-matching models (the `Policy` protocol)."""


@hookspec
def register_samplers(register):
    """Register rollout samplers: ODE/SDE integrators with log-probabilities (the `Sampler` protocol)."""


@hookspec
def register_rewards(register):
    """Register reward models that score decoded samples (the `Reward` protocol)."""


@hookspec
def register_optimizers(register):
    """Register policy optimizers: the RL algorithms such as GRPO (the `PolicyOptimizer` protocol)."""


@hookspec
def register_commands(app):
    """Add subcommands to the `ff` Typer application."""
