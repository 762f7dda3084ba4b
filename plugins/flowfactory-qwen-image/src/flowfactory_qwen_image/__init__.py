"""flowfactory-qwen-image: the Qwen-Image policy (`qwen-image`), trained as LoRA or full finetune.

This entry-point module imports only flowfactory and pydantic, so `ff list` stays fast; torch, diffusers
and transformers are imported by `build` (see `flowfactory_qwen_image.policy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from flowfactory import hookimpl
from flowfactory.policies import quiet_transformers
from flowfactory.policies.options import DiffusersPolicyOptions, LoraOptions
from flowfactory.registry import BuildContext

if TYPE_CHECKING:
    from flowfactory.plan import PolicyPlan
    from flowfactory_qwen_image.policy import QwenImagePolicy

__version__ = "0.1.0"
__all__ = ["QWEN_IMAGE_LORA_TARGETS", "LoraOptions", "QwenImageOptions", "build", "plan", "register_policies"]

# Qwen-Image's dual-stream attention projections: image stream, then text stream (same names as FLUX/SD3).
QWEN_IMAGE_LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class QwenImageOptions(DiffusersPolicyOptions):
    """Options of the `qwen-image` policy."""

    pipeline_name: ClassVar[str] = "QwenImagePipeline"

    height: int | None = Field(
        None, ge=1, description="Image height in pixels (multiple of patch size 2 x the VAE scale factor, 16 for "
                                "Qwen-Image). null: 1024 for `model` (QwenImagePipeline's default), 32 for the "
                                "tiny preset.")
    width: int | None = Field(
        None, ge=1, description="Image width in pixels (multiple of patch size 2 x the VAE scale factor). null: as "
                                "height.")
    max_sequence_length: int | None = Field(
        None, ge=1, le=1024, description="Prompt tokens (after the template's system prefix) kept and padded to. "
                                         "null: 512 as QwenImagePipeline, or 32 for the tiny preset.")
    true_cfg_scale: float | None = Field(
        None, ge=0.0, description="True classifier-free guidance scale; above 1 each velocity runs a conditional "
                                  "and an unconditional (negative prompt) pass and rescales the mix to the "
                                  "conditional norm, as QwenImagePipeline. null: 4.0 for `model`, 1.0 (no CFG) for "
                                  "the tiny preset.")
    negative_prompt: str = Field(
        " ", description="The unconditional prompt of true CFG (used only when true_cfg_scale > 1); Qwen-Image's "
                         "examples use a single space.")


def build(options: QwenImageOptions, ctx: BuildContext) -> QwenImagePolicy:
    """Build a `QwenImagePolicy` (imports torch and diffusers only now)."""
    with quiet_transformers():
        from flowfactory_qwen_image.policy import build_policy

    return build_policy(options, ctx)


def plan(options: QwenImageOptions, ctx: BuildContext) -> PolicyPlan:
    """The policy's modules and per-sample shapes on the meta device, for `ff plan` (no weights loaded)."""
    with quiet_transformers():
        from flowfactory_qwen_image.memory import plan_policy

    return plan_policy(options, ctx)


@hookimpl
def register_policies(register: Any) -> None:
    register("qwen-image", build, options=QwenImageOptions, plan=plan,
             summary="Qwen-Image text-to-image (diffusers), true CFG, LoRA or full finetune; preset tiny.")
