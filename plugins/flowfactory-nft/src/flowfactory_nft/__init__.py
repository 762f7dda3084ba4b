"""DiffusionNFT as a flowfactory policy optimizer (`nft`).

Imports only flowfactory and pydantic; the loss (torch) lives in `flowfactory_nft.loss`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flowfactory import hookimpl


class NFTOptions(BaseModel):
    """Options of `nft`; defaults follow NVlabs/DiffusionNFT (config/nft.py, config/base.py)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    beta: float = Field(1.0, gt=0, description=(
        "Implicit-policy strength: v+ = (1 - beta) v_old + beta v_theta, v- = (1 + beta) v_old - beta v_theta."))
    adv_clip: float = Field(5.0, gt=0, description=(
        "Advantages clipped to [-c, c] (after the run's train.adv_clip) and scaled by it: optimality probability "
        "r = 0.5 + 0.5 * clip(A, -c, c) / c."))
    kl_beta: float = Field(0.0, ge=0, description=(
        "Weight of mean (v_theta - v_ref)^2 to the reference policy (0 skips the reference forward)."))
    num_times: int | None = Field(None, ge=1, description=(
        "K training times per rollout, each its own forward/backward; default the sampler's step count."))
    time_sampling: Literal["discrete", "uniform", "logit-normal"] = Field("discrete", description=(
        "How training times t are drawn: `discrete` (distinct points of a grid, per rollout), `uniform` on "
        "[0, 1), or `logit-normal` (sigmoid of a normal)."))
    discrete_grid: Literal["schedule", "even"] = Field("schedule", description=(
        "With `discrete`: the grid is the rollout's sigma schedule without its final 0 (the reference), or "
        "`even`: the K points 1, 1 - 1/K, ..., 1/K."))
    logit_mean: float = Field(0.0, description="Mean of the normal under the sigmoid (`logit-normal`).")
    logit_std: float = Field(1.0, gt=0, description="Std of the normal under the sigmoid (`logit-normal`).")
    time_shift: float = Field(1.0, gt=0, description=(
        "Shift s applied to every drawn time: t' = s t / (1 + (s - 1) t); 1 leaves t unchanged."))
    old_decay_flat: int = Field(0, ge=0, description=(
        "Old-policy EMA: decay is 0 (old = current) for the first `old_decay_flat` optimizer steps."))
    old_decay_rate: float = Field(0.001, ge=0, description=(
        "Old-policy EMA: decay = min((step - flat) * rate, max), `step` the optimizer steps taken."))
    old_decay_max: float = Field(0.5, ge=0, lt=1, description="Old-policy EMA: the decay's ceiling.")
    old_update: Literal["epoch", "step"] = Field("epoch", description=(
        "When the old policy moves toward the trained one: once per epoch after its last optimizer step "
        "(the reference), or after every optimizer step."))
    seed: int = Field(0, ge=0, description=(
        "Mixed with the run seed for the training times and forward-process noise (a non-negative integer)."))

    @model_validator(mode="after")
    def _even_needs_k(self) -> NFTOptions:
        if self.time_sampling == "discrete" and self.discrete_grid == "even" and self.num_times is None:
            raise ValueError("`discrete_grid: even` needs `num_times` (the number of evenly spaced times)")
        return self


def _build(options: NFTOptions, ctx: Any) -> Any:
    from flowfactory_nft.loss import NFT

    return NFT(options, seed=int(getattr(ctx, "seed", 0) or 0))


@hookimpl
def register_optimizers(register: Any) -> None:
    register("nft", _build, options=NFTOptions,
             summary="DiffusionNFT: forward-process negative-aware finetuning with an EMA old policy, ODE rollouts.")
