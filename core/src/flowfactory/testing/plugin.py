"""An inline test plugin that registers the toy policy as `toy` (not an entry point: tests add it).

    from flowfactory.plugins import load
    from flowfactory.testing import plugin as toy_plugin
    state = load(extra_plugins=[(toy_plugin, "flowfactory-testing", "0")])
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from flowfactory.hookspecs import hookimpl


class ToyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    size: int = Field(8, ge=2, description="Image side in pixels.")
    hidden: int = Field(32, ge=1)
    shift: float = Field(1.0, gt=0, description="Sigma shift of the schedule.")


def _build(options: ToyOptions, ctx):
    from flowfactory.testing.toy import ToyPolicy

    return ToyPolicy(seed=ctx.seed, size=options.size, hidden=options.hidden, shift=options.shift,
                     device=ctx.device)


def _plan(options: ToyOptions, ctx):
    """The toy policy's memory plan (`ff plan`): its net built on the meta device, a frozen copy it always keeps,
    the character table it encodes prompts with, float32 pixel latents."""
    import torch

    from flowfactory.plan import Part, PolicyPlan, module_part
    from flowfactory.testing.toy import ToyVelocityNet

    channels, cond_dim = 3, 16  # ToyPolicy's defaults, which `_build` keeps
    with torch.device("meta"):
        net = ToyVelocityNet(channels, options.hidden, cond_dim)
    parts = (module_part("net", "trained", net, lambda n, p: True), module_part("net (reference copy)", "reference", net),
             Part("char_table", "text encoder", "Tensor", 0, frozen={"float32": 128 * cond_dim}))
    side = options.size
    return PolicyPlan(parts, (channels, side, side), "float32", (channels, side, side),
                      {"text": ((cond_dim,), "float32")})


@hookimpl
def register_policies(register):
    register("toy", _build, options=ToyOptions, plan=_plan, summary="Tiny pixel-space conv policy for tests.")
