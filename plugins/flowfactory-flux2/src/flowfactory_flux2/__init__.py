"""flowfactory-flux2: the FLUX.2 policies, `flux2` (FLUX.2 [dev]) and `flux2-klein` (FLUX.2 [klein]), trained as
LoRA or full finetune.

This entry-point module imports only flowfactory and pydantic, so `ff list` stays fast; torch, diffusers
and transformers are imported by `build` (see `flowfactory_flux2.policy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from flowfactory import hookimpl
from flowfactory.registry import BuildContext
from flowfactory_diffusers import quiet_transformers
from flowfactory_diffusers.options import DEFAULT_LORA_TARGETS, DiffusersPolicyOptions, LoraOptions

if TYPE_CHECKING:
    from flowfactory.plan import PolicyPlan
    from flowfactory_flux2.policy import Flux2Policy

__version__ = "0.1.0"
__all__ = ["FLUX2_LORA_TARGETS", "Flux2KleinOptions", "Flux2Options", "LoraOptions", "build", "build_klein", "plan",
           "plan_klein", "register_policies"]

# The attention projections of the double-stream blocks (image stream, then text stream) and the single-stream
# blocks' fused QKV + MLP input projection. A single block's output projection is `attn.to_out` (a Linear) while a
# double block's `attn.to_out` is a ModuleList, so it cannot be a suffix target: name it per block instead
# (`single_transformer_blocks.0.attn.to_out`, ...).
FLUX2_LORA_TARGETS: tuple[str, ...] = (*DEFAULT_LORA_TARGETS, "to_qkv_mlp_proj")


def _lora_targets() -> list[str]:
    return list(FLUX2_LORA_TARGETS)


class Flux2LoraOptions(LoraOptions):
    """A peft LoRA adapter on the FLUX.2 transformer; the base weights stay frozen."""

    target_modules: list[str] = Field(
        default_factory=_lora_targets, min_length=1,
        description="Module names (peft suffix match) that get an adapter. Default: the double-stream blocks' "
                    "attention projections (to_q/to_k/to_v/to_out.0, add_q_proj/add_k_proj/add_v_proj/to_add_out) and "
                    "the single-stream blocks' fused input projection to_qkv_mlp_proj.")


class _Flux2CommonOptions(DiffusersPolicyOptions):
    """What both FLUX.2 policies take: size and prompt length, on top of the shared diffusers options."""

    input_images: ClassVar[tuple[int, int]] = (0, 0)  # text-to-image: `ff validate` refuses records with images

    lora: Flux2LoraOptions | None = Field(
        None, description="Train a LoRA adapter with these settings; null: full finetune of the transformer.")
    height: int | None = Field(
        None, ge=1, description="Image height in pixels (a multiple of 2 x the VAE scale factor: 16 for FLUX.2). "
                                "null: 1024 for `model` (the pipelines' default), 32 for the tiny preset.")
    width: int | None = Field(
        None, ge=1, description="Image width in pixels (a multiple of 2 x the VAE scale factor). null: as height.")
    max_sequence_length: int | None = Field(
        None, ge=1, description="Prompt tokens (chat template included) the text is padded or truncated to. null: "
                                "512 as the pipelines, or 48 for the tiny preset.")


class Flux2Options(_Flux2CommonOptions):
    """Options of the `flux2` policy (FLUX.2 [dev])."""

    pipeline_name: ClassVar[str] = "Flux2Pipeline"

    guidance_scale: float = Field(
        4.0, ge=0.0, description="Distilled guidance fed to the transformer's guidance embedder (FLUX.2 [dev] is "
                                 "guidance-distilled: one transformer pass per velocity); 4.0 is Flux2Pipeline's "
                                 "default. Ignored by a transformer without guidance_embeds.")


class Flux2KleinOptions(_Flux2CommonOptions):
    """Options of the `flux2-klein` policy (FLUX.2 [klein])."""

    pipeline_name: ClassVar[str] = "Flux2KleinPipeline"

    guidance_scale: float | None = Field(
        None, ge=0.0, description="Classifier-free guidance scale; above 1 every velocity runs a conditional and an "
                                  "unconditional (empty prompt) pass, as Flux2KleinPipeline. null: 4.0 (the "
                                  "pipeline's default) for a base model, 1.0 (no CFG) for a step-distilled one "
                                  "(is_distilled in its model_index.json) and for the tiny preset. A distilled model "
                                  "rejects a scale above 1.")


def build(options: Flux2Options, ctx: BuildContext) -> Flux2Policy:
    """Build a `Flux2Policy` (imports torch and diffusers only now)."""
    with quiet_transformers():
        from flowfactory_flux2.policy import build_policy

    return build_policy(options, ctx)


def build_klein(options: Flux2KleinOptions, ctx: BuildContext) -> Flux2Policy:
    """Build a `Flux2KleinPolicy` (imports torch and diffusers only now)."""
    with quiet_transformers():
        from flowfactory_flux2.policy import build_klein_policy

    return build_klein_policy(options, ctx)


def plan(options: Flux2Options, ctx: BuildContext) -> PolicyPlan:
    """The `flux2` policy's modules and per-sample shapes on the meta device, for `ff plan` (no weights loaded)."""
    with quiet_transformers():
        from flowfactory_flux2.memory import plan_policy

    return plan_policy(options, ctx, klein=False)


def plan_klein(options: Flux2KleinOptions, ctx: BuildContext) -> PolicyPlan:
    """The `flux2-klein` policy's modules and per-sample shapes on the meta device, for `ff plan`."""
    with quiet_transformers():
        from flowfactory_flux2.memory import plan_policy

    return plan_policy(options, ctx, klein=True)


@hookimpl
def register_policies(register: Any) -> None:
    register("flux2", build, options=Flux2Options, plan=plan,
             summary="FLUX.2 [dev] text-to-image (diffusers), LoRA or full finetune; preset tiny.")
    register("flux2-klein", build_klein, options=Flux2KleinOptions, plan=plan_klein,
             summary="FLUX.2 [klein] text-to-image (diffusers), CFG, LoRA or full finetune; preset tiny.")
