"""Flow-GRPO as a flowfactory policy optimizer (`grpo`).

Imports only flowfactory and pydantic; the loss (torch) lives in `flowfactory_grpo.loss`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from flowfactory import hookimpl


class GRPOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clip_range: float = Field(1e-4, gt=0, description="PPO ratio clip: ratio kept in [1 - c, 1 + c].")
    adv_clip: float = Field(5.0, gt=0, description="Advantages clipped to [-c, c] inside the loss.")
    kl_beta: float = Field(0.0, ge=0, description="Weight of the KL to the reference policy (0 disables).")


def _build(options: GRPOOptions, ctx):
    from flowfactory_grpo.loss import GRPO

    return GRPO(options)


@hookimpl
def register_optimizers(register):
    register("grpo", _build, options=GRPOOptions,
             summary="Flow-GRPO: clipped-ratio policy gradient over SDE steps, optional KL to the reference.")
