"""Flow-GRPO as a flowfactory policy optimizer (`grpo`).

Imports only flowfactory and pydantic; the loss (torch) lives in `flowfactory_grpo.loss`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flowfactory import hookimpl


class GRPOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    clip_range: float = Field(1e-4, gt=0, description="PPO ratio clip: ratio kept in [1 - c, 1 + c].")
    adv_clip: float = Field(5.0, gt=0, description=(
        "Advantages clipped to [-c, c] inside the loss, after the run's train.adv_clip (a no-op while c >= it)."))
    kl_beta: float = Field(0.0, ge=0, description="Weight of the KL to the reference policy (0 disables).")
    kl_normalization: Literal["step", "flow-grpo"] = Field("step", description=(
        "What the KL's squared mean difference is divided by: `step` = 2 x the step's variance std_t^2 |dt| (the "
        "Gaussian KL of the step); `flow-grpo` = 2 std_t^2 without |dt|, as Flow-GRPO's code, which is 1/|dt| "
        "(3-16x at 10 steps) weaker, so a kl_beta copied from a Flow-GRPO config means the same there."))
    guard: bool = Field(False, description=(
        "GRPO-Guard (arXiv 2510.22319): clip the RatioNorm ratio exp(s * (log r + mean|mu - mu_old|^2 / (2 s^2))), "
        "s the step's std, instead of r. Needs the `flow-sde` sampler."))
    guard_reweight: bool = Field(True, description=(
        "With `guard`: weight each step's policy loss by 1 / |dt| (GRPO-Guard's gradient reweighting); "
        "false keeps RatioNorm only."))


def _build(options: GRPOOptions, ctx: Any) -> Any:
    from flowfactory_grpo.loss import GRPO

    return GRPO(options)


@hookimpl
def register_optimizers(register):
    register("grpo", _build, options=GRPOOptions,
             summary="Flow-GRPO: clipped-ratio policy gradient over SDE steps, optional KL and GRPO-Guard.")
