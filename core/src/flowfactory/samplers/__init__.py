"""Built-in samplers, registered through the same hook a third-party plugin uses.

This module imports only pydantic and flowfactory; the math (torch) lives in `flowfactory.samplers.flow`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flowfactory.hookspecs import hookimpl


class ODEOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(10, ge=1, description="Euler steps from sigma=1 to 0.")


class FlowSDEOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(10, ge=2, description="Integration steps from sigma=1 to 0.")
    noise_level: float = Field(0.7, gt=0.0, description="Flow-GRPO's a: std_t = a * sqrt(sigma / (1 - sigma)).")
    sde_window_size: int | None = Field(
        None, ge=1, description="Stochastic steps per rollout (Flow-GRPO-Fast); null: every step but the last.")
    sde_window_range: tuple[int, int] | None = Field(
        None, description="[lo, hi): where the window may start; drawn per epoch. Default [0, steps // 2].")
    deterministic_last_step: bool = Field(
        True, description="Integrate the last step (to sigma=0) without noise, so samples are clean.")

    @model_validator(mode="after")
    def _window(self) -> FlowSDEOptions:
        last = self.steps - (1 if self.deterministic_last_step else 0)
        if self.sde_window_size is not None and self.sde_window_size > last:
            raise ValueError(f"sde_window_size={self.sde_window_size} exceeds the {last} steps that can be stochastic")
        if self.sde_window_range is not None:
            lo, hi = self.sde_window_range
            if self.sde_window_size is None:
                raise ValueError("sde_window_range needs sde_window_size")
            if not (0 <= lo < hi and hi + self.sde_window_size - 1 <= last):
                raise ValueError(f"sde_window_range must satisfy 0 <= lo < hi and hi + size - 1 <= {last}")
        return self


def _build_ode(options: ODEOptions, ctx):
    from flowfactory.samplers.flow import ODESampler

    return ODESampler(steps=options.steps)


def _build_flow_sde(options: FlowSDEOptions, ctx):
    from flowfactory.samplers.flow import FlowSDESampler

    return FlowSDESampler(options, seed=ctx.seed)


@hookimpl
def register_samplers(register):
    register("ode", _build_ode, options=ODEOptions, summary="Deterministic Euler ODE sampler (no log-probs).")
    register("flow-sde", _build_flow_sde, options=FlowSDEOptions,
             summary="Flow-GRPO SDE sampler with Gaussian log-probs; optional SDE window (Flow-GRPO-Fast).")
