"""Advantage Weighted Matching (Xue et al. 2025) as a flowfactory policy optimizer (`awm`).

Imports only flowfactory and pydantic; the loss (torch) lives in `flowfactory_awm.loss`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flowfactory import hookimpl


class AWMOptions(BaseModel):
    """Options of `awm`; names follow the reference's `config.train.*` where one exists."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    num_times: int = Field(6, ge=1, description=(
        "K: noise levels t per rollout (shared by the pass over the epoch for discrete and logit_normal), each its own "
        "forward/backward (reference `train_timesteps`)."))
    time_type: Literal["discrete", "uniform", "logit_normal"] = Field("discrete", description=(
        "How t is drawn: `discrete` = the sampler's sigmas, one stratum each, never the first (reference "
        "`discrete_wo_init`); `uniform` = stratified in [time_min, time_max], per sample; `logit_normal` = "
        "stratified logit-normal, shared by the pass."))
    time_shift: float = Field(3.0, gt=0, description=(
        "Shift s of `uniform`/`logit_normal` times: t <- s t / (1 + (s - 1) t) (1 = none)."))
    timestep_fraction: float = Field(0.9, gt=0, le=1, description=(
        "`discrete`: sample indices 1 .. int(steps * fraction) of the sampler's schedule."))
    time_min: float = Field(0.2, ge=0, lt=1, description="`uniform`: lower bound before the shift.")
    time_max: float = Field(1.0, gt=0, le=1, description="`uniform`: upper bound before the shift.")
    logit_mean: float = Field(0.0, description="`logit_normal`: mean m of the normal before the sigmoid.")
    logit_std: float = Field(1.0, gt=0, description="`logit_normal`: std s of the normal before the sigmoid.")
    logit_t_min: float = Field(0.01, ge=0, lt=1, description="`logit_normal`: times clamped to >= this.")
    weighting: Literal["uniform", "t", "t^2", "huber", "ghuber"] = Field("ghuber", description=(
        "Time weighting of the flow-matching error e = mean((v - (eps - x0))^2): uniform -e, t: -t e, "
        "t^2: -t^2 e, huber: -t (sqrt(e + delta) - sqrt(delta)), ghuber: -t ((e + delta)^p - delta^p) / p."))
    huber_delta: float = Field(1e-10, gt=0, description="delta of `huber` and `ghuber` (reference: 1e-10).")
    ghuber_power: float = Field(0.25, gt=0, description="p of `ghuber` (reference configs: 0.25).")
    clip_range: float = Field(1.0, gt=0, description="PPO clip c: the ratio is kept in [1 - c, 1 + c].")
    adv_clip: float = Field(5.0, gt=0, description=(
        "Advantages clipped to [-c, c] inside the loss, after the run's train.adv_clip (a no-op while c >= it)."))
    advantage_max: float | None = Field(None, gt=0, description=(
        "If set, the clipped advantages are rescaled by advantage_max / adv_clip (reference configs: 1)."))
    kl_beta: float = Field(0.0, ge=0, description="Weight of the KL to the reference policy (0 skips it).")
    kl_weight: Literal["uniform", "elbo"] = Field("uniform", description=(
        "KL to the reference: mean((v - v_ref)^2), or that / (2 std_t^2), std_t = 0.7 sqrt(t / (1 - min(t, .99)))."))
    ema_kl_beta: float = Field(0.0, ge=0, description="Weight of the KL to the EMA policy (0 skips it).")
    ema_kl_weight: Literal["uniform", "elbo"] = Field("uniform", description="As `kl_weight`, for the EMA KL.")
    ema_decay: float = Field(0.3, ge=0, lt=1, description="Decay of the EMA policy (reference `kl_ema_decay`).")
    ema_decay_schedule: Literal["constant", "linear"] = Field("linear", description=(
        "`linear`: decay = min(ema_decay, 0.001 * optimizer steps so far) (reference `kl_ema_decay_type`)."))
    ema_update: Literal["epoch", "step"] = Field("epoch", description=(
        "Update the EMA policy once per epoch after its optimizer steps (the reference), or after every step."))
    off_policy: bool = Field(False, description=(
        "Roll out with the EMA policy and take it as the old policy of the ratio (reference `off_policy`)."))

    @model_validator(mode="after")
    def _bounds(self) -> AWMOptions:
        if self.time_min >= self.time_max:
            raise ValueError("time_min must be below time_max")
        return self


def _build(options: AWMOptions, ctx: Any) -> Any:
    from flowfactory_awm.loss import AWM

    return AWM(options, seed=getattr(ctx, "seed", 0))


@hookimpl
def register_optimizers(register):
    register("awm", _build, options=AWMOptions,
             summary="Advantage Weighted Matching: advantage-weighted clipped flow-matching likelihood, ODE rollouts.")
