"""flowfactory-qwen-image: the Qwen-Image policies, trained as LoRA or full finetune: `qwen-image` (text to image),
`qwen-image-edit` (Qwen-Image-Edit: one input image), `qwen-image-edit-plus` (Qwen-Image-Edit-2509: several) and
`qwen-image-2.1` (Qwen-Image 2.1: another architecture, text to image).

This entry-point module imports only flowfactory and pydantic, so `ff list` stays fast; torch, diffusers
and transformers are imported by the build functions (see `flowfactory_qwen_image.policy`, `.edit`, `.qwen21`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from flowfactory import hookimpl
from flowfactory.registry import BuildContext
from flowfactory_diffusers import quiet_transformers
from flowfactory_diffusers.options import (
    ATTENTION_LORA_TARGETS,
    DEFAULT_LORA_TARGETS,
    DiffusersPolicyOptions,
    LoraOptions,
)

if TYPE_CHECKING:
    from flowfactory.plan import PolicyPlan
    from flowfactory_qwen_image.edit import QwenImageEditPolicy
    from flowfactory_qwen_image.policy import QwenImagePolicy
    from flowfactory_qwen_image.qwen21 import QwenImage21Policy

__version__ = "0.1.0"
__all__ = ["QWEN_IMAGE_21_LORA_TARGETS", "QWEN_IMAGE_LORA_TARGETS", "LoraOptions", "QwenImage21LoraOptions",
           "QwenImage21Options", "QwenImageEditOptions", "QwenImageEditPlusOptions", "QwenImageOptions", "build",
           "build_edit", "build_edit_plus", "build_qwen21", "plan", "plan_edit", "plan_qwen21", "register_policies"]

# Qwen-Image's dual-stream attention projections: image stream, then text stream (the MMDiT names of FLUX/SD3).
QWEN_IMAGE_LORA_TARGETS: tuple[str, ...] = DEFAULT_LORA_TARGETS


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


class QwenImageEditOptions(QwenImageOptions):
    """Options of the `qwen-image-edit` policy (Qwen-Image-Edit: one input image per prompt record)."""

    pipeline_name: ClassVar[str] = "QwenImageEditPipeline"
    input_images: ClassVar[tuple[int, int]] = (1, 1)  # per prompt record, checked by `ff validate`

    height: int | None = Field(
        None, ge=1, description="Output height in pixels (multiple of patch size 2 x the VAE scale factor, 16 for "
                                "Qwen-Image). null: 1024 for `model`, 32 for the tiny preset. The input images keep "
                                "their own size (image_area).")
    max_sequence_length: int | None = Field(
        None, ge=1, le=16384, description="Conditioning tokens after the template's system prefix (the input "
                                          "images' vision tokens, the instruction, the template's end) padded to; a "
                                          "record needing more is an error naming it (the pipeline cuts nothing). "
                                          "null: 2048 for `model` (a 1024x1024 input is 1369 vision tokens), 128 for "
                                          "the tiny preset.")
    image_area: int | None = Field(
        None, ge=1024, description="Pixel area each input image is resized to (aspect ratio kept, sides rounded to "
                                   "multiples of 32) before the VAE encodes it (and, for qwen-image-edit, before "
                                   "Qwen2.5-VL sees it). null: 1048576 (1024x1024) for `model`, as the pipeline; "
                                   "1024 (32x32) for the tiny preset.")


class QwenImageEditPlusOptions(QwenImageEditOptions):
    """Options of the `qwen-image-edit-plus` policy (Qwen-Image-Edit-2509: one or more input images per record)."""

    pipeline_name: ClassVar[str] = "QwenImageEditPlusPipeline"

    condition_image_area: int | None = Field(
        None, ge=1024, description="Pixel area each input image is resized to (aspect ratio kept, sides rounded to "
                                   "multiples of 32) before Qwen2.5-VL sees it. null: 147456 (384x384) for `model`, "
                                   "as the pipeline; 1024 (32x32) for the tiny preset.")
    max_images: int = Field(
        3, ge=1, le=16, description="The most input images a record may have (rows are padded to this many); "
                                    "Qwen-Image-Edit-2509 is made for one to three.")

    @property
    def input_images(self) -> tuple[int, int]:  # type: ignore[override]
        """One to max_images input images per prompt record (`ff validate` checks the prompt sets)."""
        return (1, self.max_images)


# Qwen-Image 2.1's single-stream attention projections (one set per block, text and image tokens alike).
QWEN_IMAGE_21_LORA_TARGETS: tuple[str, ...] = ATTENTION_LORA_TARGETS


class QwenImage21LoraOptions(LoraOptions):
    """A peft LoRA adapter on the Qwen-Image 2.1 transformer; the base weights stay frozen."""

    target_modules: list[str] = Field(
        default_factory=lambda: list(QWEN_IMAGE_21_LORA_TARGETS), min_length=1,
        description="Module names (peft suffix match) that get an adapter. Default: the attention projections "
                    "to_q/to_k/to_v/to_out.0 of every block (feed-forward: img_mlp.proj, img_mlp.gate_layer, "
                    "img_mlp.out).")


class QwenImage21Options(DiffusersPolicyOptions):
    """Options of the `qwen-image-2.1` policy (Qwen-Image 2.1 text-to-image)."""

    pipeline_name: ClassVar[str] = "QwenImage21Pipeline"

    lora: QwenImage21LoraOptions | None = Field(  # type: ignore[assignment]
        None, description="Train a LoRA adapter with these settings; null: full finetune of the transformer.")
    height: int | None = Field(
        None, ge=1, description="Image height in pixels (multiple of 32: 2x2 latent tokens of 16x16 pixels make one "
                                "slot of the joint sequence). null: 1024 for `model` (QwenImage21Pipeline's "
                                "output_resolution), 64 for the tiny preset.")
    width: int | None = Field(
        None, ge=1, description="Image width in pixels (multiple of 32). null: as height.")
    max_sequence_length: int | None = Field(
        None, ge=1, le=16384, description="Prompt tokens after the system message, padded to (each prompt still "
                                          "runs at its own length); a longer prompt is an error naming it (the "
                                          "pipeline cuts nothing). null: 1024 for `model`, 64 for the tiny preset.")
    true_cfg_scale: float = Field(
        1.0, ge=0.0, description="Classifier-free guidance scale; above 1 each velocity runs a conditional and a "
                                 "negative-prompt pass mixed as neg + s (cond - neg), as QwenImage21Pipeline. 1.0 "
                                 "(no guidance) is the pipeline's default: Qwen-Image 2.1 is sampled without it.")
    negative_prompt: str = Field(
        " ", description="The unconditional prompt of CFG (used only when true_cfg_scale > 1).")


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


def build_edit(options: QwenImageEditOptions, ctx: BuildContext) -> QwenImageEditPolicy:
    """Build a `QwenImageEditPolicy` (imports torch and diffusers only now)."""
    with quiet_transformers():
        from flowfactory_qwen_image.edit import build_edit_policy

    return build_edit_policy(options, ctx, plus=False)


def build_edit_plus(options: QwenImageEditPlusOptions, ctx: BuildContext) -> QwenImageEditPolicy:
    """Build a `QwenImageEditPlusPolicy` (imports torch and diffusers only now)."""
    with quiet_transformers():
        from flowfactory_qwen_image.edit import build_edit_policy

    return build_edit_policy(options, ctx, plus=True)


def build_qwen21(options: QwenImage21Options, ctx: BuildContext) -> QwenImage21Policy:
    """Build a `QwenImage21Policy` (imports torch and diffusers only now)."""
    with quiet_transformers():
        from flowfactory_qwen_image.qwen21 import build_policy

    return build_policy(options, ctx)


def plan_qwen21(options: QwenImage21Options, ctx: BuildContext) -> PolicyPlan:
    """The `qwen-image-2.1` policy's modules and per-sample shapes on the meta device, for `ff plan`."""
    with quiet_transformers():
        from flowfactory_qwen_image.memory import plan_qwen21_policy

    return plan_qwen21_policy(options, ctx)


def plan_edit(options: QwenImageEditOptions, ctx: BuildContext) -> PolicyPlan:
    """`plan` for the editing policies: the same modules, and the input images' latents in the conditioning."""
    with quiet_transformers():
        from flowfactory_qwen_image.memory import plan_edit_policy

    return plan_edit_policy(options, ctx)


@hookimpl
def register_policies(register: Any) -> None:
    register("qwen-image", build, options=QwenImageOptions, plan=plan,
             summary="Qwen-Image text-to-image (diffusers), true CFG, LoRA or full finetune; preset tiny.")
    register("qwen-image-edit", build_edit, options=QwenImageEditOptions, plan=plan_edit,
             summary="Qwen-Image-Edit: edits a record's input image (diffusers), true CFG, LoRA or full; preset tiny.")
    register("qwen-image-edit-plus", build_edit_plus, options=QwenImageEditPlusOptions, plan=plan_edit,
             summary="Qwen-Image-Edit-2509: edits with 1-3 input images per record (diffusers); preset tiny.")
    register("qwen-image-2.1", build_qwen21, options=QwenImage21Options, plan=plan_qwen21,
             summary="Qwen-Image 2.1 text-to-image (diffusers): Qwen3-VL, single-stream transformer; preset tiny.")
