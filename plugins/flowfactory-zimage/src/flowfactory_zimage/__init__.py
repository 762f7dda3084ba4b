"""flowfactory-zimage: the Z-Image policy (`z-image`: Z-Image-Turbo, Z-Image), trained as LoRA or full finetune.

This entry-point module imports only flowfactory and pydantic, so `ff list` stays fast; torch, diffusers
and transformers are imported by `build` (see `flowfactory_zimage.policy`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from flowfactory import hookimpl
from flowfactory.registry import BuildContext
from flowfactory_diffusers import quiet_transformers
from flowfactory_diffusers.options import ATTENTION_LORA_TARGETS, DiffusersPolicyOptions, LoraOptions

if TYPE_CHECKING:
    from flowfactory.plan import PolicyPlan
    from flowfactory_zimage.policy import ZImagePolicy

__version__ = "0.1.0"
__all__ = ["Z_IMAGE_LORA_TARGETS", "ZImageLoraOptions", "ZImageOptions", "build", "plan", "register_policies"]

# The attention projections of Z-Image's single-stream blocks (refiners and main blocks alike).
Z_IMAGE_LORA_TARGETS: tuple[str, ...] = ATTENTION_LORA_TARGETS


class ZImageLoraOptions(LoraOptions):
    """A peft LoRA adapter on the Z-Image transformer; the base weights stay frozen."""

    target_modules: list[str] = Field(
        default_factory=lambda: list(Z_IMAGE_LORA_TARGETS), min_length=1,
        description="Module names (peft suffix match) that get an adapter. Default: the attention projections "
                    "to_q/to_k/to_v/to_out.0 of every block (feed-forward: feed_forward.w1, feed_forward.w2, "
                    "feed_forward.w3; modulation: adaLN_modulation.0).")


class ZImageOptions(DiffusersPolicyOptions):
    """Options of the `z-image` policy."""

    pipeline_name: ClassVar[str] = "ZImagePipeline"
    tiny_defaults: ClassVar[Mapping[str, Any]] = {"height": 32, "width": 32, "max_sequence_length": 64,
                                                  "guidance_scale": 0.0}
    # ZImagePipeline's (`height or 1024`; guidance 5.0 is Z-Image's, Z-Image-Turbo runs at 0)
    model_defaults: ClassVar[Mapping[str, Any]] = {"height": 1024, "width": 1024, "max_sequence_length": 512,
                                                   "guidance_scale": 5.0}
    width_follows_height: ClassVar[bool] = True

    lora: ZImageLoraOptions | None = Field(  # type: ignore[assignment]
        None, description="Train a LoRA adapter with these settings; null: full finetune of the transformer.")
    height: int | None = Field(
        None, ge=1, description="Image height in pixels (multiple of 2 x the VAE scale factor: 16 for Z-Image, 2 for "
                                "the tiny preset). null: 1024 for `model` (ZImagePipeline's default), 32 for the "
                                "tiny preset.")
    width: int | None = Field(
        None, ge=1, description="Image width in pixels (same multiple as height). null: as height.")
    max_sequence_length: int | None = Field(
        None, ge=1, description="Tokens of the chat-templated prompt kept (the Qwen3 tokenizer truncates there; "
                                "only the real tokens reach the transformer). null: 512 as ZImagePipeline, or 64 "
                                "for the tiny preset.")
    guidance_scale: float | None = Field(
        None, ge=0.0, description="Classifier-free guidance scale, ZImagePipeline's: above 0 each velocity runs a "
                                  "conditional and a negative-prompt pass in one batch and mixes them as cond + g x "
                                  "(cond - uncond); 0 runs one pass. Z-Image-Turbo is distilled for 0. null: 5.0 "
                                  "for `model` (ZImagePipeline's default, meant for Z-Image), 0.0 for the tiny preset.")
    negative_prompt: str = Field(
        "", description="The unconditional prompt of CFG (used only when guidance_scale > 0); ZImagePipeline's "
                        "default is the empty prompt.")
    cfg_normalization: float = Field(
        0.0, ge=0.0, description="ZImagePipeline's cfg_normalization: above 0, a guided velocity whose norm exceeds "
                                 "this times the conditional one's is scaled down to it (true = 1.0); 0: off.")
    cfg_truncation: float = Field(
        1.0, ge=0.0, description="ZImagePipeline's cfg_truncation: CFG is skipped (one conditional pass) at the "
                                 "steps where 1 - sigma exceeds it, i.e. the last, least noisy ones; 1.0: never.")


def build(options: ZImageOptions, ctx: BuildContext) -> ZImagePolicy:
    """Build a `ZImagePolicy` (imports torch and diffusers only now)."""
    with quiet_transformers():
        from flowfactory_zimage.policy import build_policy

    return build_policy(options, ctx)


def plan(options: ZImageOptions, ctx: BuildContext) -> PolicyPlan:
    """The policy's modules and per-sample shapes on the meta device, for `ff plan` (no weights loaded)."""
    with quiet_transformers():
        from flowfactory_zimage.memory import plan_policy

    return plan_policy(options, ctx)


@hookimpl
def register_policies(register: Any) -> None:
    register("z-image", build, options=ZImageOptions, plan=plan,
             summary="Z-Image / Z-Image-Turbo text-to-image (diffusers), CFG, LoRA or full finetune; preset tiny.")
