"""flowfactory-flux: the FLUX.1 policy (`flux`), trained as LoRA or full finetune.

This entry-point module imports only flowfactory and pydantic, so `ff list` stays fast; torch, diffusers
and transformers are imported by `build` (see `flowfactory_flux.policy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from flowfactory import hookimpl
from flowfactory.policies import quiet_transformers
from flowfactory.policies.options import DEFAULT_LORA_TARGETS, DiffusersPolicyOptions, LoraOptions
from flowfactory.registry import BuildContext

if TYPE_CHECKING:
    from flowfactory.plan import PolicyPlan
    from flowfactory_flux.policy import FluxPolicy

__version__ = "0.1.0"
__all__ = ["DEFAULT_LORA_TARGETS", "FluxOptions", "LoraOptions", "build", "plan", "register_policies"]


class FluxOptions(DiffusersPolicyOptions):
    """Options of the `flux` policy."""

    pipeline_name: ClassVar[str] = "FluxPipeline"

    height: int | None = Field(
        None, ge=1, description="Image height in pixels (multiple of 2 x the VAE scale factor). null: 512, or 32 "
                                "for the tiny preset.")
    width: int | None = Field(
        None, ge=1, description="Image width in pixels (multiple of 2 x the VAE scale factor). null: 512, or 32 "
                                "for the tiny preset.")
    max_sequence_length: int | None = Field(
        None, ge=1, le=512, description="T5 tokens the prompt is padded/truncated to. null: 512 as FLUX.1, or 32 "
                                        "for the tiny preset (most of a small transformer's time is text tokens).")
    guidance_scale: float = Field(
        3.5, ge=0.0, description="Distilled guidance fed to transformers with guidance_embeds (FLUX.1-dev); "
                                 "ignored by models without it (FLUX.1-schnell, the tiny preset).")


def build(options: FluxOptions, ctx: BuildContext) -> FluxPolicy:
    """Build a `FluxPolicy` (imports torch and diffusers only now)."""
    with quiet_transformers():
        from flowfactory_flux.policy import build_policy

    return build_policy(options, ctx)


def plan(options: FluxOptions, ctx: BuildContext) -> PolicyPlan:
    """The policy's modules and per-sample shapes on the meta device, for `ff plan` (no weights loaded)."""
    with quiet_transformers():
        from flowfactory_flux.memory import plan_policy

    return plan_policy(options, ctx)


@hookimpl
def register_policies(register: Any) -> None:
    register("flux", build, options=FluxOptions, plan=plan,
             summary="FLUX.1 text-to-image (diffusers), LoRA or full finetune; preset tiny for CPU.")
