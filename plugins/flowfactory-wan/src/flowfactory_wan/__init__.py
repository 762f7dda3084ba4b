"""flowfactory-wan: the Wan 2.1 / 2.2 policies, trained as LoRA or full finetune: `wan` (text-to-video) and
`wan-i2v` (image-to-video and first-last-frame-to-video from a prompt record's input images).

This entry-point module imports only flowfactory and pydantic, so `ff list` stays fast; torch, diffusers
and transformers are imported by the build functions (see `flowfactory_wan.policy` and `flowfactory_wan.i2v`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, model_validator

from flowfactory import hookimpl
from flowfactory.registry import BuildContext
from flowfactory_diffusers import quiet_transformers
from flowfactory_diffusers.options import ATTENTION_LORA_TARGETS, DiffusersPolicyOptions, LoraOptions

if TYPE_CHECKING:
    from flowfactory.plan import PolicyPlan
    from flowfactory_wan.i2v import WanI2VPolicy
    from flowfactory_wan.policy import WanPolicy

__version__ = "0.1.0"
__all__ = ["WAN_I2V_LORA_TARGETS", "WAN_IMAGE_LORA_TARGETS", "WAN_LORA_TARGETS", "WanI2VLoraOptions", "WanI2VOptions",
           "WanLoraOptions", "WanOptions", "build", "build_i2v", "plan", "plan_i2v", "register_policies"]

# Wan blocks' self-attention (attn1) and text cross-attention (attn2) projections.
WAN_LORA_TARGETS: tuple[str, ...] = ATTENTION_LORA_TARGETS
# attn2's key/value projections of the CLIP image states (Wan 2.1 I2V and FLF2V; Wan 2.2 I2V has none), which
# image-to-video adapts too: diffusers' Wan LoRA loader reads a LoRA with them as an I2V LoRA; one without gets
# zero adapters padded in, which peft then reports as modules missing from the adapter's config.
WAN_IMAGE_LORA_TARGETS: tuple[str, ...] = ("add_k_proj", "add_v_proj")
WAN_I2V_LORA_TARGETS: tuple[str, ...] = (*WAN_LORA_TARGETS, *WAN_IMAGE_LORA_TARGETS)


class WanLoraOptions(LoraOptions):
    """A peft LoRA adapter on each Wan expert (the same settings on both experts of Wan 2.2 A14B)."""

    target_modules: list[str] = Field(
        default_factory=lambda: list(WAN_LORA_TARGETS), min_length=1,
        description="Module names (peft suffix match) that get an adapter. Default: the self- and cross-attention "
                    "projections to_q/to_k/to_v/to_out.0 (feed-forward: ffn.net.0.proj, ffn.net.2).")


class WanI2VLoraOptions(WanLoraOptions):
    """`wan-i2v`'s LoRA: by default the image cross-attention projections as well."""

    target_modules: list[str] = Field(
        default_factory=lambda: list(WAN_I2V_LORA_TARGETS), min_length=1,
        description="Module names (peft suffix match) that get an adapter. Default: the self- and cross-attention "
                    "projections to_q/to_k/to_v/to_out.0 and the image cross-attention's add_k_proj/add_v_proj "
                    "(Wan 2.1 I2V and FLF2V; left out on Wan 2.2 I2V, which has none). Feed-forward: ffn.net.0.proj, "
                    "ffn.net.2.")


class WanOptions(DiffusersPolicyOptions):
    """Options of the `wan` policy."""

    pipeline_name: ClassVar[str] = "WanPipeline"
    input_images: ClassVar[tuple[int, int]] = (0, 0)  # text-to-video: `ff validate` refuses records with images
    tiny_defaults: ClassVar[Mapping[str, Any]] = {
        "height": 16, "width": 16, "num_frames": 5, "max_sequence_length": 16, "guidance_scale": 1.0}
    model_defaults: ClassVar[Mapping[str, Any]] = {  # WanPipeline's
        "height": 480, "width": 832, "num_frames": 81, "max_sequence_length": 512, "guidance_scale": 5.0}

    lora: WanLoraOptions | None = Field(  # type: ignore[assignment]
        None, description="Train a LoRA adapter (on every expert) with these settings; null: full finetune of "
                          "the transformer(s).")
    height: int | None = Field(
        None, ge=1, description="Video height in pixels (multiple of the VAE's spatial factor x patch size, 16 for "
                                "Wan 2.1, 4 for the tiny preset). null: 480, or 16 for the tiny preset.")
    width: int | None = Field(
        None, ge=1, description="Video width in pixels (same multiple as height). null: 832, or 16 for the tiny preset.")
    num_frames: int | None = Field(
        None, ge=1, description="Frames per video; num_frames - 1 must be a multiple of the VAE's temporal factor "
                                "(4 for Wan, 2 for the tiny preset). null: 81 as WanPipeline, or 5 for the tiny preset.")
    max_sequence_length: int | None = Field(
        None, ge=1, le=512, description="UMT5 tokens the prompt is padded/truncated to. null: 512 as WanPipeline, "
                                        "or 16 for the tiny preset.")
    guidance_scale: float | None = Field(
        None, ge=0.0, description="Classifier-free guidance scale; above 1 the policy runs the conditional and the "
                                  "negative-prompt pass in one batch. null: 5.0 for `model`, 1.0 for the tiny preset.")
    guidance_scale_2: float | None = Field(
        None, ge=0.0, description="CFG scale of the second (low-noise) expert of Wan 2.2 A14B. null: guidance_scale.")
    negative_prompt: str = Field(
        "", description="The unconditional prompt of CFG (used only when guidance_scale > 1).")
    shift: float | None = Field(
        None, gt=0.0, description="The scheduler's flow shift (FlowMatchEuler `shift` or UniPC `flow_shift`). "
                                  "null: the pipeline's (Wan 2.1 T2V ships 3.0; 5.0 is usual for 720p).")
    boundary_ratio: float | None = Field(
        None, gt=0.0, lt=1.0, description="Two-expert models: the first (high-noise) expert acts while timestep >= "
                                          "boundary_ratio x 1000, the second below. null: the pipeline's (0.875 for "
                                          "Wan 2.2 A14B T2V).")
    tiny_experts: int = Field(
        1, ge=1, le=2, description="Tiny preset only: 2 builds a Wan 2.2-style pair of experts (boundary 0.875).")

    @model_validator(mode="after")
    def _tiny_only(self) -> WanOptions:
        if self.tiny_experts != 1 and self.preset is None:
            raise ValueError("`tiny_experts` applies to `preset: tiny` only; a `model` brings its own experts")
        return self


class WanI2VOptions(WanOptions):
    """Options of the `wan-i2v` policy (every prompt record gives the first frame, or the first and last)."""

    pipeline_name: ClassVar[str] = "WanImageToVideoPipeline"
    # per prompt record, checked by `ff validate`: the first frame, or the first and the last (which the model
    # itself narrows: Wan 2.1 I2V one, FLF2V two; `encode` names a record it cannot read)
    input_images: ClassVar[tuple[int, int]] = (1, 2)

    lora: WanI2VLoraOptions | None = Field(  # type: ignore[assignment]
        None, description="Train a LoRA adapter (on every expert) with these settings; null: full finetune of "
                          "the transformer(s).")

    height: int | None = Field(
        None, ge=1, description="Video height in pixels (multiple of the VAE's spatial factor x patch size, 16 for "
                                "Wan, 4 for the tiny preset); input images are resized to it. null: 480, or 16 for "
                                "the tiny preset.")
    width: int | None = Field(
        None, ge=1, description="Video width in pixels (same multiple as height); input images are resized to it. "
                                "null: 832, or 16 for the tiny preset.")
    num_frames: int | None = Field(
        None, ge=1, description="Frames per video, the input image the first (and a record's second image the "
                                "last); num_frames - 1 must be a multiple of the VAE's temporal factor (4 for Wan, 2 "
                                "for the tiny preset). null: 81 as WanImageToVideoPipeline, or 5 for the tiny preset.")
    max_sequence_length: int | None = Field(
        None, ge=1, le=512, description="UMT5 tokens the prompt is padded/truncated to. Wan 2.1 I2V reads the last "
                                        "512 context tokens as text, so it needs 512. null: 512, or 16 for the tiny "
                                        "preset's two experts (tiny_experts: 2).")
    shift: float | None = Field(
        None, gt=0.0, description="The scheduler's flow shift (FlowMatchEuler `shift` or UniPC `flow_shift`). "
                                  "null: the pipeline's (3.0 is usual for 480p, 5.0 for 720p).")
    boundary_ratio: float | None = Field(
        None, gt=0.0, lt=1.0, description="Two-expert models: the first (high-noise) expert acts while timestep >= "
                                          "boundary_ratio x 1000, the second below. null: the pipeline's (0.9 for "
                                          "Wan 2.2 I2V A14B).")
    tiny_experts: int = Field(
        1, ge=1, le=2, description="Tiny preset only: 1 is Wan 2.1 I2V-style (a tiny CLIP image encoder); 2 is Wan "
                                   "2.2 I2V A14B-style (two experts, boundary 0.9, no image encoder).")


def build(options: WanOptions, ctx: BuildContext) -> WanPolicy:
    """Build a `WanPolicy` (imports torch and diffusers only now)."""
    with quiet_transformers():
        from flowfactory_wan.policy import build_policy

    return build_policy(options, ctx)


def plan(options: WanOptions, ctx: BuildContext) -> PolicyPlan:
    """The policy's modules and per-sample shapes on the meta device, for `ff plan` (no weights loaded)."""
    with quiet_transformers():
        from flowfactory_wan.memory import plan_policy

    return plan_policy(options, ctx)


def build_i2v(options: WanI2VOptions, ctx: BuildContext) -> WanI2VPolicy:
    """Build a `WanI2VPolicy` (imports torch and diffusers only now)."""
    with quiet_transformers():
        from flowfactory_wan.i2v import build_i2v_policy

    return build_i2v_policy(options, ctx)


def plan_i2v(options: WanI2VOptions, ctx: BuildContext) -> PolicyPlan:
    """`plan` for `wan-i2v`: the same parts and the image encoder, the image condition in the conditioning."""
    with quiet_transformers():
        from flowfactory_wan.memory import plan_i2v_policy

    return plan_i2v_policy(options, ctx)


@hookimpl
def register_policies(register: Any) -> None:
    register("wan", build, options=WanOptions, plan=plan,
             summary="Wan 2.1/2.2 text-to-video (diffusers), CFG, two experts, LoRA or full finetune; preset tiny.")
    register("wan-i2v", build_i2v, options=WanI2VOptions, plan=plan_i2v,
             summary="Wan 2.1/2.2 image-to-video and first-last-frame from a record's images (diffusers); preset tiny.")
