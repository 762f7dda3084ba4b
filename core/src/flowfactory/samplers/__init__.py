"""Built-in samplers, registered through the same hook a third-party plugin uses, and the base classes a
new sampler subclasses.

This module imports only pydantic and flowfactory; the math (torch) lives in `flowfactory.samplers.flow`.
`SDESampler` (a new SDE sampler defines only `sde_step`), `ODESampler` (a new ODE sampler defines only
`ode_step`) and `gaussian_log_prob` are importable from here, loaded on first use so that importing the
options models stays free of torch. Import them inside a build function, not at a plugin's top level.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flowfactory.hookspecs import hookimpl

_LAZY = ("SDESampler", "ODESampler", "gaussian_log_prob")  # defined in flowfactory.samplers.flow (torch)


def __getattr__(name: str):
    if name in _LAZY:
        from flowfactory.samplers import flow

        return getattr(flow, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ODEOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    steps: int = Field(10, ge=1, description="Euler steps from sigma=1 to 0.")


class SlidingWindowSchedule(BaseModel):
    """MixGRPO's sliding SDE window (Li et al. 2025): the window starts at the first position and moves
    `stride` steps every `every_epochs` epochs; after the last position it starts over (or stays there)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    type: Literal["sliding"] = Field(description="`sliding`: MixGRPO's progressive window (the only schedule).")
    stride: int = Field(1, ge=1, description="Steps the window moves at each shift (MixGRPO's window stride s).")
    every_epochs: int = Field(
        25, ge=1, description="Epochs between shifts (MixGRPO's shift interval tau; its reference's iters_per_group, "
                              "an iteration being one rollout batch and its updates, as one epoch here).")
    restart: bool = Field(
        True, description="After the last position start over at the first (the reference's --roll_back); false: "
                          "stay at the last position (min(l + s, last start)).")


class SDEWindowOptions(BaseModel):
    """Options every SDE sampler shares: step count and which steps are stochastic (the SDE window)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    steps: int = Field(10, ge=2, description="Integration steps from sigma=1 to 0.")
    sde_window_size: int | None = Field(
        None, ge=1, description="Stochastic steps per rollout (Flow-GRPO-Fast); null: every step but the last.")
    sde_window_range: tuple[int, int] | None = Field(
        None, description="[lo, hi): where the window may start; drawn per epoch. Default [0, min(steps // 2, "
                          "last - sde_window_size + 1)), last = the number of steps that may be stochastic; with a "
                          "sliding sde_window_schedule, the starts it slides over, default [0, last - size + 1).")
    sde_window_schedule: SlidingWindowSchedule | None = Field(
        None, description="How the window's start follows the epoch: null draws it per epoch from sde_window_range "
                          "(Flow-GRPO-Fast); {type: sliding, ...} slides it over sde_window_range (default: every "
                          "start where the window fits), MixGRPO.")
    deterministic_last_step: bool = Field(
        True, description="Integrate the last step (to sigma=0) without noise, so samples are clean.")
    ode_solver: Literal["euler", "dpm-solver++2m"] = Field(
        "euler", description="Integrator of the deterministic steps after the SDE window (MixGRPO-Flash): `euler`, "
                             "or `dpm-solver++2m`, the second-order multistep DPM-Solver++ on the data prediction "
                             "x - sigma v, started afresh after the window (its first step and the step to sigma 0 "
                             "are Euler). Needs sde_window_size. Steps before the window, deterministic (eval) "
                             "rollouts and step_distribution stay Euler; trained steps are unchanged.")

    @model_validator(mode="after")
    def _window(self) -> SDEWindowOptions:
        last = self.steps - (1 if self.deterministic_last_step else 0)
        if self.ode_solver != "euler" and self.sde_window_size is None:
            raise ValueError(f"ode_solver={self.ode_solver} integrates the steps after the SDE window and needs "
                             f"sde_window_size: without it only the last step (to sigma 0, an Euler step in any "
                             f"solver) follows the window")
        if self.sde_window_size is not None and self.sde_window_size > last:
            raise ValueError(f"sde_window_size={self.sde_window_size} exceeds the {last} steps that can be stochastic")
        if self.sde_window_range is not None:
            lo, hi = self.sde_window_range
            if self.sde_window_size is None:
                raise ValueError("sde_window_range needs sde_window_size")
            if not (0 <= lo < hi and hi + self.sde_window_size - 1 <= last):
                raise ValueError(f"sde_window_range must satisfy 0 <= lo < hi and hi + size - 1 <= {last}")
        if self.sde_window_schedule is not None and self.sde_window_size is None:
            raise ValueError("sde_window_schedule needs sde_window_size (the number of stochastic steps it slides)")
        return self


class FlowSDEOptions(SDEWindowOptions):
    noise_level: float = Field(0.7, gt=0.0, description="Flow-GRPO's a: std_t = a * sqrt(sigma / (1 - sigma)).")


class DanceSDEOptions(SDEWindowOptions):
    eta: float = Field(0.3, gt=0.0, description="DanceGRPO's eta: the step std is eta * sqrt(sigma - sigma_next).")


class CPSOptions(SDEWindowOptions):
    noise_level: float = Field(
        0.7, gt=0.0, le=1.0,
        description="Coefficients-preserving noise level a in (0, 1]: std = sigma_next * sin(a * pi / 2).")
    deterministic_last_step: bool = Field(
        True, description="Must stay true: CPS's last step (sigma_next=0) has std 0, so it cannot be stochastic.")

    @model_validator(mode="after")
    def _last_step(self) -> CPSOptions:
        if not self.deterministic_last_step:
            raise ValueError("deterministic_last_step must be true for cps: its std is sigma_next * sin(a pi / 2), "
                             "which is 0 at the last step (sigma_next = 0)")
        return self


def _build_ode(options: ODEOptions, ctx):
    from flowfactory.samplers.flow import ODESampler

    return ODESampler(steps=options.steps)


def _build_flow_sde(options: FlowSDEOptions, ctx):
    from flowfactory.samplers.flow import FlowSDESampler

    return FlowSDESampler(options, seed=ctx.seed)


def _build_dance_sde(options: DanceSDEOptions, ctx):
    from flowfactory.samplers.flow import DanceSDESampler

    return DanceSDESampler(options, seed=ctx.seed)


def _build_cps(options: CPSOptions, ctx):
    from flowfactory.samplers.flow import CPSSampler

    return CPSSampler(options, seed=ctx.seed)


@hookimpl
def register_samplers(register):
    register("ode", _build_ode, options=ODEOptions, summary="Deterministic Euler ODE sampler (no log-probs).")
    register("flow-sde", _build_flow_sde, options=FlowSDEOptions,
             summary="Flow-GRPO SDE sampler with Gaussian log-probs; optional SDE window (Flow-GRPO-Fast).")
    register("dance-sde", _build_dance_sde, options=DanceSDEOptions,
             summary="DanceGRPO's SDE step (score-corrected Euler, std eta sqrt(-dt)); optional SDE window.")
    register("cps", _build_cps, options=CPSOptions,
             summary="Coefficients-Preserving Sampling (Flow-GRPO's sde_type=cps) with Gaussian log-probs.")
