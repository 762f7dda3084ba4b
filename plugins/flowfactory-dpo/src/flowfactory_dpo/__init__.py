"""Online Diffusion-DPO (Wallace et al. 2023) for flow matching, as a flowfactory policy optimizer (`dpo`).

Imports only flowfactory and pydantic; the loss (torch) lives in `flowfactory_dpo.loss`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flowfactory import hookimpl


class DPOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    source: Literal["rollouts", "dataset"] = Field("rollouts", description=(
        "rollouts: online DPO, pairs within each group of the epoch's rollouts, ranked by reward. dataset: offline "
        "DPO on the prompt records' `chosen` and `rejected` images (group_size 2: one row each; nothing sampled)."))
    beta: float = Field(5000.0, gt=0, description=(
        "beta of -log sigmoid(-beta/2 ((e_w - e_w_ref) - (e_l - e_l_ref))), errors e averaged over latent dims "
        "(Diffusion-DPO's `beta_dpo`; its SD1.5 and SDXL runs use 5000)."))
    pairs: Literal["best-worst", "all"] = Field("best-worst", description=(
        "Pairs formed in each group of rollouts: `best-worst` = the highest- vs the lowest-reward rollout; `all` = "
        "every pair whose reward gap exceeds min_gap, the higher-reward one preferred."))
    min_gap: float = Field(0.0, ge=0, description=(
        "A pair is formed only when its reward gap r_w - r_l is > min_gap (a group of equal rewards gives none)."))
    num_times: int = Field(4, ge=1, description=(
        "K noise levels t per pair (stratified over the K units), each its own forward/backward."))
    time_min: float = Field(0.0, ge=0, lt=1, description="Times are drawn uniformly in [time_min, time_max] before the shift.")
    time_max: float = Field(1.0, gt=0, le=1, description="Upper bound of the uniform times before the shift.")
    time_shift: float = Field(1.0, gt=0, description="Shift s of the times: t <- s t / (1 + (s - 1) t) (1 = none).")

    @model_validator(mode="after")
    def _bounds(self) -> DPOOptions:
        if self.time_min >= self.time_max:
            raise ValueError("time_min must be below time_max")
        return self


def _build(options: DPOOptions, ctx: Any) -> Any:
    from flowfactory_dpo.loss import DPO

    return DPO(options, seed=getattr(ctx, "seed", 0))


@hookimpl
def register_optimizers(register):
    register("dpo", _build, options=DPOOptions,
             summary="Diffusion-DPO: pairs within each group of rollouts (or a dataset's chosen/rejected images), "
                     "flow-matching errors vs the reference.")
