"""flowfactory-flux: the FLUX.1 policies, `flux` (text-to-image) and `flux-kontext` (image editing), trained as
LoRA or full finetune.

This entry-point module imports only flowfactory and pydantic, so `ff list` stays fast; torch, diffusers
and transformers are imported by `build` (see `flowfactory_flux.policy`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from flowfactory import hookimpl
from flowfactory.registry import BuildContext
from flowfactory_diffusers import quiet_transformers
from flowfactory_diffusers.options import DEFAULT_LORA_TARGETS, DiffusersPolicyOptions, LoraOptions

if TYPE_CHECKING:
    from flowfactory.plan import PolicyPlan
    from flowfactory_flux.kontext import FluxKontextPolicy
    from flowfactory_flux.policy import FluxPolicy

__version__ = "0.1.0"
__all__ = ["DEFAULT_LORA_TARGETS", "FluxKontextOptions", "FluxOptions", "LoraOptions", "build", "build_kontext", "plan",
           "plan_kontext", "register_policies"]


class FluxOptions(DiffusersPolicyOptions):
    """Options of the `flux` policy."""

    pipeline_name: ClassVar[str] = "FluxPipeline"
    tiny_defaults: ClassVar[Mapping[str, Any]] = {"height": 32, "width": 32, "max_sequence_length": 32}
    model_defaults: ClassVar[Mapping[str, Any]] = {"height": 512, "width": 512, "max_sequence_length": 512}

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


class FluxKontextOptions(FluxOptions):
    """Options of the `flux-kontext` policy: FLUX.1's, for the edited image; the source is resized to its size."""

    pipeline_name: ClassVar[str] = "FluxKontextPipeline"
    input_images: ClassVar[tuple[int, int]] = (1, 1)  # every prompt record gives exactly one source image

    height: int | None = Field(
        None, ge=1, description="Height in pixels of the edited image (multiple of 2 x the VAE scale factor); each "
                                "source image is resized to height x width before it is encoded. null: 512, or 32 "
                                "for the tiny preset.")
    width: int | None = Field(
        None, ge=1, description="Width in pixels of the edited image (multiple of 2 x the VAE scale factor); see "
                                "`height`. null: 512, or 32 for the tiny preset.")
    guidance_scale: float = Field(
        2.5, ge=0.0, description="Distilled guidance fed to transformers with guidance_embeds (FLUX.1-Kontext-dev; "
                                 "2.5 as its model card uses); ignored by models without it (the tiny preset).")


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


def build_kontext(options: FluxKontextOptions, ctx: BuildContext) -> FluxKontextPolicy:
    """Build a `FluxKontextPolicy` (imports torch and diffusers only now)."""
    with quiet_transformers():
        from flowfactory_flux.kontext import build_kontext_policy

    return build_kontext_policy(options, ctx)


def plan_kontext(options: FluxKontextOptions, ctx: BuildContext) -> PolicyPlan:
    """`plan` for `flux-kontext`: FLUX.1's, plus the source latents in the conditioning."""
    with quiet_transformers():
        from flowfactory_flux.memory import plan_kontext_policy

    return plan_kontext_policy(options, ctx)


@hookimpl
def register_policies(register: Any) -> None:
    register("flux", build, options=FluxOptions, plan=plan,
             summary="FLUX.1 text-to-image (diffusers), LoRA or full finetune; preset tiny for CPU.")
    register("flux-kontext", build_kontext, options=FluxKontextOptions, plan=plan_kontext,
             summary="FLUX.1 Kontext image editing (diffusers): one input image per prompt; preset tiny for CPU.")
