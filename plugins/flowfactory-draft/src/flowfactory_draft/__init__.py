"""Reward back-propagation as a flowfactory policy optimizer (`draft`): DRaFT-K, DRaFT-LV and ReFL.

Imports only flowfactory and pydantic; the loss (torch) lives in `flowfactory_draft.loss`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flowfactory import hookimpl


class DraftOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    variant: Literal["draft", "refl", "draft-lv"] = Field("draft", description=(
        "`draft` (DRaFT-K): re-run the last `k` sampler steps with grad from the stored state before them, "
        "decode, score; `refl` (ReFL): per sample one step t drawn from the last `k`, predict the clean latent "
        "x_t - sigma_t v in one grad step, decode, score; `draft-lv` (DRaFT-LV, k = 1): re-noise the final "
        "sample to the last step's sigma `lv_samples` times and run the last step with grad on each."))
    k: int = Field(1, ge=1, description=(
        "`draft`: sampler steps differentiated through (DRaFT-K); `refl`: the late steps t is drawn from; "
        "`draft-lv` needs 1."))
    lv_samples: int = Field(2, ge=1, description=(
        "`draft-lv`: re-noised copies of each sample, each its own forward/backward (the loss is their mean)."))
    checkpointing: bool = Field(True, description=(
        "Gradient checkpointing per differentiated step: keep only each step's input and recompute its "
        "activations in the backward pass (memory of one step instead of k, one extra forward per step)."))
    seed: int = Field(0, ge=0, description="Mixed with the run seed for ReFL's steps and DRaFT-LV's noise.")

    @model_validator(mode="after")
    def _lv_is_one_step(self) -> DraftOptions:
        if self.variant == "draft-lv" and self.k != 1:
            raise ValueError("`variant: draft-lv` differentiates the last step only: set k: 1")
        return self


def _build(options: DraftOptions, ctx: Any) -> Any:
    from flowfactory_draft.loss import Draft

    return Draft(options, seed=int(getattr(ctx, "seed", 0) or 0))


@hookimpl
def register_optimizers(register: Any) -> None:
    register("draft", _build, options=DraftOptions,
             summary="Reward back-propagation (DRaFT-K, DRaFT-LV, ReFL) through the last steps and the decode.")
