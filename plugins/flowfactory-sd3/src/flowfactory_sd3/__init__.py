"""flowfactory-sd3: the Stable Diffusion 3 / 3.5 policy (`sd3`), trained as LoRA or full finetune.

This entry-point module imports only flowfactory and pydantic, so `ff list` stays fast; torch, diffusers
and transformers are imported by `build` (see `flowfactory_sd3.policy`).
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
    from flowfactory_sd3.policy import SD3Policy

__version__ = "0.1.0"
__all__ = ["DEFAULT_LORA_TARGETS", "LoraOptions", "SD3Options", "build", "plan", "register_policies"]


class SD3Options(DiffusersPolicyOptions):
    """Options of the `sd3` policy."""

    pipeline_name: ClassVar[str] = "StableDiffusion3Pipeline"
    tiny_defaults: ClassVar[Mapping[str, Any]] = {"height": 32, "width": 32, "max_sequence_length": 16,
                                                  "guidance_scale": 1.0}
    # StableDiffusion3Pipeline's; the size is the transformer's sample_size x the VAE scale factor (read at build)
    model_defaults: ClassVar[Mapping[str, Any]] = {"max_sequence_length": 256, "guidance_scale": 4.5}
    width_follows_height: ClassVar[bool] = True

    height: int | None = Field(
        None, ge=1, description="Image height in pixels (multiple of patch size 2 x the VAE scale factor). null: the "
                                "model's native size (transformer sample_size x VAE scale, 1024 for SD3.5), or 32 "
                                "for the tiny preset.")
    width: int | None = Field(
        None, ge=1, description="Image width in pixels (multiple of patch size 2 x the VAE scale factor). null: as "
                                "height.")
    max_sequence_length: int | None = Field(
        None, ge=1, le=512, description="T5 tokens the prompt is padded/truncated to. null: 256 as "
                                        "StableDiffusion3Pipeline, or 16 for the tiny preset.")
    guidance_scale: float | None = Field(
        None, ge=0.0, description="Classifier-free guidance scale; above 1 the policy runs the conditional and "
                                  "unconditional (negative prompt) passes in one batch. null: 4.5 for `model` "
                                  "(SD3.5's usual value), 1.0 (no CFG) for the tiny preset.")
    negative_prompt: str = Field(
        "", description="The unconditional prompt of CFG (used only when guidance_scale > 1).")


def build(options: SD3Options, ctx: BuildContext) -> SD3Policy:
    """Build an `SD3Policy` (imports torch and diffusers only now)."""
    with quiet_transformers():
        from flowfactory_sd3.policy import build_policy

    return build_policy(options, ctx)


def plan(options: SD3Options, ctx: BuildContext) -> PolicyPlan:
    """The policy's modules and per-sample shapes on the meta device, for `ff plan` (no weights loaded)."""
    with quiet_transformers():
        from flowfactory_sd3.memory import plan_policy

    return plan_policy(options, ctx)


@hookimpl
def register_policies(register: Any) -> None:
    register("sd3", build, options=SD3Options, plan=plan,
             summary="Stable Diffusion 3/3.5 text-to-image (diffusers), CFG, LoRA or full finetune; preset tiny.")
