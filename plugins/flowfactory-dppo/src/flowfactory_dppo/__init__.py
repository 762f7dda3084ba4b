"""Flow-DPPO as a flowfactory policy optimizer (`dppo`).

Imports only flowfactory and pydantic; the loss (torch) lives in `flowfactory_dppo.loss`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flowfactory import hookimpl


class DPPOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kl_threshold: float = Field(1e-5, ge=0, description=(
        "Trust region: a step whose KL D_t between the sampling and the current step Gaussians is >= this, and "
        "whose ratio moved with its advantage (r > 1 with A > 0, or r < 1 with A < 0), is masked out of the loss "
        "(reference `kl_mask_threshold`)."))
    kl_normalization: Literal["step", "none"] = Field("step", description=(
        "D_t = mean over latent dims of (mu_theta - mu_old)^2 divided by 2 s^2, s the step's std (`step`: the "
        "Gaussian KL; reference `add_kl_coefficient: true`), or by 2 alone (`none`)."))
    kl_beta: float = Field(0.0, ge=0, description=(
        "Weight of the KL to the reference policy, as grpo's `kl_normalization: step` term (0 skips the "
        "reference forward)."))


def _build(options: DPPOOptions, ctx: Any) -> Any:
    from flowfactory_dppo.loss import DPPO

    return DPPO(options)


@hookimpl
def register_optimizers(register):
    register("dppo", _build, options=DPPOOptions,
             summary="Flow-DPPO: unclipped policy gradient over SDE steps with a per-step Gaussian-KL trust-region mask.")
