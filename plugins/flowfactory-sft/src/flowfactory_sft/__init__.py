"""Supervised fine-tuning on target images (the flow-matching loss), as a flowfactory policy optimizer (`sft`).

Imports only flowfactory and pydantic; the loss (torch) lives in `flowfactory_sft.loss`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flowfactory import hookimpl


class SFTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    num_times: int = Field(1, ge=1, description=(
        "K noise levels t per row (stratified over the K units), each its own forward/backward."))
    time_min: float = Field(0.0, ge=0, lt=1, description="Times are drawn uniformly in [time_min, time_max] before the shift.")
    time_max: float = Field(1.0, gt=0, le=1, description="Upper bound of the uniform times before the shift.")
    time_shift: float = Field(1.0, gt=0, description="Shift s of the times: t <- s t / (1 + (s - 1) t) (1 = none).")

    @model_validator(mode="after")
    def _bounds(self) -> SFTOptions:
        if self.time_min >= self.time_max:
            raise ValueError("time_min must be below time_max")
        return self


def _build(options: SFTOptions, ctx: Any) -> Any:
    from flowfactory_sft.loss import SFT

    return SFT(options, seed=getattr(ctx, "seed", 0))


@hookimpl
def register_optimizers(register):
    register("sft", _build, options=SFTOptions,
             summary="Supervised fine-tuning: the flow-matching loss on each prompt record's target image.")
