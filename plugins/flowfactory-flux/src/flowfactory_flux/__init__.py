"""flowfactory-flux: the FLUX.1 policy (`flux`), trained as LoRA or full finetune.

This entry-point module imports only flowfactory and pydantic, so `ff list` stays fast; torch, diffusers
and transformers are imported by `build` (see `flowfactory_flux.policy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flowfactory import hookimpl
from flowfactory.registry import BuildContext

if TYPE_CHECKING:
    from flowfactory_flux.policy import FluxPolicy

__version__ = "0.1.0"

DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0",  # image-stream attention (double and single blocks)
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",  # text-stream attention (double blocks)
)


class LoraOptions(BaseModel):
    """A peft LoRA adapter on the transformer; the base weights stay frozen."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(32, ge=1, description="LoRA rank r.")
    alpha: float | None = Field(
        None, gt=0, description="LoRA alpha: the update is scaled by alpha / rank. null: equal to rank (scale 1).")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS), min_length=1,
        description="Module names (peft suffix match) that get an adapter. Default: the attention projections "
                    "of both streams, to_q/to_k/to_v/to_out.0 and add_q_proj/add_k_proj/add_v_proj/to_add_out.")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Dropout on the LoRA branch. It applies in every velocity call, rollouts included, so keep 0 "
                    "for on-policy algorithms whose old and new log-probs must agree.")
    init: Literal["default", "gaussian"] = Field(
        "default", description="peft init of A (B is zero either way, so the adapter starts as the identity): "
                               "default = Kaiming-uniform A, gaussian = Gaussian A.")


class FluxOptions(BaseModel):
    """Options of the `flux` policy."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="Hub id (black-forest-labs/FLUX.1-dev) or local folder of a diffusers FluxPipeline, "
                          "loaded with FluxPipeline.from_pretrained. Give this or `preset`.")
    preset: Literal["tiny"] | None = Field(
        None, description="tiny: a ~7M-parameter random FLUX built in-process from the run seed (32x32 images, "
                          "4-channel VAE at scale 1, no downloads), for tests and CPU quickstarts. Give this or `model`.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `model`.")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype of the frozen parts (text encoders, VAE, and the transformer's base weights under "
                          "LoRA). null: the run's dtype if set, else float32 for the tiny preset and bfloat16 "
                          "for `model`. A full finetune keeps the trainable transformer in float32.")
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
    lora: LoraOptions | None = Field(
        None, description="Train a LoRA adapter with these settings; null: full finetune of the transformer.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute transformer block activations in backward: less memory, more compute.")

    @model_validator(mode="after")
    def _source(self) -> FluxOptions:
        if (self.model is None) == (self.preset is None):
            got = "both" if self.model is not None else "neither"
            raise ValueError(f"give exactly one of `model` (a hub id or local FluxPipeline folder) or `preset` "
                             f"(tiny); got {got}")
        if self.preset is not None and self.revision is not None:
            raise ValueError("`revision` applies to `model` only; remove it when using `preset`")
        return self


def build(options: FluxOptions, ctx: BuildContext) -> FluxPolicy:
    """Build a `FluxPolicy` (imports torch and diffusers only now)."""
    from transformers.utils import logging as hf_logging

    # Importing diffusers' pipelines makes transformers warn that torchvision is missing (for image
    # processors FLUX never uses); keep that out of a run's output.
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        from flowfactory_flux.policy import build_policy
    finally:
        hf_logging.set_verbosity(previous)

    return build_policy(options, ctx)


@hookimpl
def register_policies(register: Any) -> None:
    register("flux", build, options=FluxOptions,
             summary="FLUX.1 text-to-image (diffusers), LoRA or full finetune; preset tiny for CPU.")
