"""An inline test plugin that registers the toy policy as `toy` (not an entry point: tests add it).

    from flowfactory.plugins import load
    from flowfactory.testing import plugin as toy_plugin
    state = load(extra_plugins=[(toy_plugin, "flowfactory-testing", "0")])
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from flowfactory.hookspecs import hookimpl


class ToyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(8, ge=2, description="Image side in pixels.")
    hidden: int = Field(32, ge=1)
    shift: float = Field(1.0, gt=0, description="Sigma shift of the schedule.")


def _build(options: ToyOptions, ctx):
    from flowfactory.testing.toy import ToyPolicy

    return ToyPolicy(seed=ctx.seed, size=options.size, hidden=options.hidden, shift=options.shift,
                     device=ctx.device)


@hookimpl
def register_policies(register):
    register("toy", _build, options=ToyOptions, summary="Tiny pixel-space conv policy for tests.")
