"""Option models shared by diffusers policy plugins; pydantic only, so entry-point modules may import them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flowfactory.config import PATH_OR_HUB_ID

# The projections of a diffusers attention module: a single-stream block's (Z-Image, Qwen-Image 2.1, Wan), or
# the image stream's of an MMDiT.
ATTENTION_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
# The attention projections of both streams of an MMDiT (FLUX, SD3, Qwen-Image): image stream, then text stream.
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    *ATTENTION_LORA_TARGETS,  # image-stream attention (double and single blocks)
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",  # text-stream attention (double blocks)
)


class LoraOptions(BaseModel):
    """A peft LoRA adapter on the transformer; the base weights stay frozen."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

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


class DiffusersPolicyOptions(BaseModel):
    """Options every diffusers-pipeline policy shares: where the weights come from, dtype, LoRA or full
    finetune, gradient checkpointing. A model's options subclass it and add their own (size, guidance)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    pipeline_name: ClassVar[str] = "diffusers pipeline"  # named in the error when model/preset are wrong
    # what this model's null options mean: one table for the tiny preset, one for a real `model` (the pipeline's
    # own defaults); `resolved` applies them, so the build function and `ff plan` read the same values
    tiny_defaults: ClassVar[Mapping[str, Any]] = {}
    model_defaults: ClassVar[Mapping[str, Any]] = {}
    width_follows_height: ClassVar[bool] = False  # True: a null width is the given height (a square image)

    model: str | None = Field(
        None, description="Hub id or local folder of the model's diffusers pipeline, loaded with from_pretrained "
                          "(a relative folder: to the config's folder, then the working directory). Give this or "
                          "`preset`.", json_schema_extra=PATH_OR_HUB_ID)
    preset: Literal["tiny"] | None = Field(
        None, description="tiny: a small random model of this architecture built in-process from the run seed (no "
                          "downloads; the plugin's README gives its sizes), for tests and CPU quickstarts. Give this "
                          "or `model`.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `model`.")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype of the frozen parts (text encoders, VAE, and the transformer's base weights under "
                          "LoRA). null: float32 for the tiny preset and bfloat16 for `model` (or the BuildContext's "
                          "dtype when the code building the policy sets one; `ff run` does not). A full finetune "
                          "keeps the trainable transformer in float32.")
    lora: LoraOptions | None = Field(
        None, description="Train a LoRA adapter with these settings; null: full finetune of the transformer.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute transformer block activations in backward: less memory, more compute.")
    offload_text_encoders: bool = Field(
        False, description="Keep the text encoders in CPU memory and move them to the device only while they "
                           "encode (then back, freeing the device's cache): T5-XXL, UMT5-XXL or Qwen2.5-VL no "
                           "longer hold 10-16 GB of the device between encodes. Same conditioning, slower encodes.")
    vae_decode_chunk: int | None = Field(
        None, ge=1, description="Decode latents with the VAE this many samples at a time (the same images, a "
                                "smaller activation peak: video VAEs need it at full size). null: the whole batch "
                                "at once.")

    @model_validator(mode="after")
    def _source(self) -> DiffusersPolicyOptions:
        if (self.model is None) == (self.preset is None):
            got = "both" if self.model is not None else "neither"
            raise ValueError(f"give exactly one of `model` (a hub id or local {self.pipeline_name} folder) or "
                             f"`preset` (tiny); got {got}")
        if self.preset is not None and self.revision is not None:
            raise ValueError("`revision` applies to `model` only; remove it when using `preset`")
        return self

    def defaults(self, tiny: bool, **known: Any) -> dict[str, Any]:
        """The values of this model's null options: `tiny_defaults` for the tiny preset, else `model_defaults`,
        updated with `known` (defaults that only the loaded pipeline knows, e.g. its sample size); with
        `width_follows_height`, a given height is also the width's default."""
        table = {**(self.tiny_defaults if tiny else self.model_defaults), **known}
        if self.width_follows_height and getattr(self, "height", None) is not None:
            table["width"] = self.height
        return table

    def resolved(self, tiny: bool, **known: Any) -> Any:
        """A copy of these options whose null fields named by `defaults(tiny, **known)` take those values."""
        table = self.defaults(tiny, **known)
        return self.model_copy(update={k: v for k, v in table.items() if getattr(self, k) is None})
