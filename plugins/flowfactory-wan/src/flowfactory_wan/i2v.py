"""`WanI2VPolicy`: Wan image-to-video (diffusers `WanImageToVideoPipeline`) seen through flowfactory's `Policy`.

Each prompt record's input image is the video's first frame; a record with two images (`"images": [first,
last]`) gives the first and the last frame (first-last-frame-to-video, the pipeline's `last_image`). `encode`
computes, per record, what the pipeline computes from its `image` (and `last_image`):

- the image condition [4 + C, F', h, w]: a frame mask (1 at the given frames, one channel per frame of the VAE's
  temporal factor) and the VAE latents (mode, normalised) of a video holding the resized image(s) at the given
  frames and zeros elsewhere (`prepare_latents`); the transformer reads it beside the noisy latents, on channels;
- for Wan 2.1 (a transformer with `image_dim`): the CLIP vision encoder's penultimate states of the image(s)
  [n, T, D] (`encode_image`), which the transformer's cross-attention reads through its added key/value
  projections. Wan 2.2 I2V A14B has no image encoder; its two experts switch as in `WanPolicy`.

Text encoding, CFG, the schedule, the expert switch, decode, LoRA and saving are `WanPolicy`'s.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image
from torch import nn

from flowfactory.errors import FlowFactoryError
from flowfactory.prompts import Prompt, as_prompts
from flowfactory.registry import BuildContext
from flowfactory.types import Conditioning
from flowfactory_diffusers.policy import load_or_build, training_kwargs
from flowfactory_wan import WAN_IMAGE_LORA_TARGETS, WanI2VOptions
from flowfactory_wan.policy import WanPolicy

TEXT_CONTEXT = 512  # diffusers' WanAttnProcessor takes the last 512 context tokens as text when it has image ones


def to_pil(image: torch.Tensor) -> Image.Image:
    """A float [3, H, W] image in [0, 1] from `Prompt.load_images()` back as the RGB PIL image of its file (its
    8-bit values come back exactly): what the pipeline is given when a user opens the file."""
    arr = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


class WanI2VPolicy(WanPolicy):
    """Implements `flowfactory.types.Policy` for `WanImageToVideoPipeline` (Wan 2.1 I2V / FLF2V, Wan 2.2 I2V)."""

    name = "wan-i2v"
    pipeline_class: ClassVar[type] = WanImageToVideoPipeline
    encode_options = ("max_sequence_length", "negative_prompt", "do_cfg", "height", "width", "num_frames",
                      "image_processor_config")
    encode_components = ("vae", "image_encoder")  # encode runs them on the input images
    lora_optional_targets = WAN_IMAGE_LORA_TARGETS  # the image cross-attention: not in Wan 2.2 I2V

    def __init__(self, pipe: Any, **kwargs: Any):
        super().__init__(pipe, **kwargs)
        config = pipe.transformer.config
        self.image_encoder: nn.Module | None = pipe.image_encoder if config.image_dim is not None else None
        # images per record: FLF2V's position embedding spans two images' states; Wan 2.1 I2V's cross-attention
        # reads one image's; without an image encoder (Wan 2.2) the last frame is optional
        self.images_per_record: tuple[int, ...] = (
            (2,) if config.image_dim is not None and config.get("pos_embed_seq_len") else
            (1,) if config.image_dim is not None else (1, 2))

    # -- the hooks of WanPolicy ------------------------------------------------------------------------------

    def _check_pipeline(self, pipe: Any) -> None:
        config, vae = pipe.transformer.config, pipe.vae.config
        want = 2 * vae.z_dim + vae.scale_factor_temporal  # noise, frame mask, image latents
        if config.in_channels != want:
            hint = ("a text-to-video model; use the wan policy" if config.in_channels == vae.z_dim
                    else "not a Wan image-to-video transformer")
            raise FlowFactoryError(
                f"{self.name} policy: the transformer takes {config.in_channels} input channels, but image-to-video "
                f"needs {want} (the VAE's {vae.z_dim} latent channels twice and a {vae.scale_factor_temporal}-channel "
                f"frame mask): {hint}")
        if config.image_dim is not None and (pipe.image_encoder is None or pipe.image_processor is None):
            raise FlowFactoryError(
                f"{self.name} policy: the transformer reads CLIP image states (image_dim={config.image_dim}) but the "
                f"pipeline has no image_encoder/image_processor; load the whole Wan 2.1 I2V repository")
        if config.get("added_kv_proj_dim") is not None and self.max_sequence_length != TEXT_CONTEXT:
            raise FlowFactoryError(
                f"{self.name} policy option max_sequence_length={self.max_sequence_length}: this Wan 2.1 "
                f"image-to-video transformer takes the last {TEXT_CONTEXT} context tokens as the text and the rest as "
                f"the image (diffusers' WanAttnProcessor), so the prompt must be padded to {TEXT_CONTEXT}; set "
                f"max_sequence_length: {TEXT_CONTEXT} or leave it null")

    def _latent_channels(self, pipe: Any) -> int:
        """The VAE's latent channels (the transformer's input adds the image condition to them)."""
        return int(pipe.vae.config.z_dim)

    def _model_input(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The noisy latents and the image condition on channels, as the pipeline's `latent_model_input`."""
        if "image_condition" not in cond:
            raise KeyError(f"{self.name} velocity: the conditioning has no image_condition; encode the prompt "
                           f"records (with their input images) with this policy")
        return torch.cat([x, cond["image_condition"].to(device=x.device, dtype=x.dtype)], dim=1)

    def _image_embeds(self, cond: Conditioning, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """CLIP states [B * n, T, D] (n images per record, each record's consecutive), as the pipeline passes
        them; None without an image encoder."""
        if self.image_encoder is None:
            return None
        if "image_embeds" not in cond:
            raise KeyError(f"{self.name} velocity: the conditioning has no image_embeds (this model reads CLIP "
                           f"image states); encode the prompt records with this policy")
        return cond["image_embeds"].to(device=device, dtype=dtype).flatten(0, 1)

    def _readme_call(self) -> str:
        last = ", last_image=last_frame" if self.images_per_record == (2,) else ""
        return (f"# first_frame{', last_frame' if last else ''}: PIL images (the prompt record's input images)\n"
                f"video = pipe(image=first_frame{last}, prompt=prompt, negative_prompt={self.negative_prompt!r}, "
                f"height={self.height}, width={self.width}, num_frames={self.num_frames}, "
                f"max_sequence_length={self.max_sequence_length}, guidance_scale={self.guidance_scale}).frames[0]")

    @property
    def image_processor_config(self) -> str | None:
        """The CLIP image processor's settings (they change the image states, so the conditioning fingerprint
        names them); None without an image encoder."""
        proc = self.pipe.image_processor if self.image_encoder is not None else None
        return None if proc is None else json.dumps(proc.to_dict(), sort_keys=True, default=str)

    # -- encode ----------------------------------------------------------------------------------------------

    def _input_images(self, record: Prompt) -> list[Image.Image]:
        """The record's first (and last) frame as RGB PIL images, after checking their number."""
        n, allowed = len(record.images), self.images_per_record
        if n == 0:
            raise FlowFactoryError(
                f"{self.name} policy: prompt {record.text!r} has no input image, and image-to-video starts from one. "
                f"Give its line of the prompt file an \"image\" field (a path relative to the file), or \"images\": "
                f"[first, last] for first-last-frame, or use the wan policy for text-to-video.")
        if n not in allowed:
            why = ("this model (Wan 2.1 FLF2V: its image position embedding spans two images) needs a first and a "
                   "last frame: \"images\": [first, last]" if allowed == (2,) else
                   "this model (Wan 2.1 I2V) reads one image, the first frame; first-last-frame needs Wan 2.1 "
                   "FLF2V or Wan 2.2 I2V A14B" if allowed == (1,) else
                   "give one image (the first frame) or two (the first and the last frame)")
            raise FlowFactoryError(f"{self.name} policy: prompt {record.text!r} has {n} input images; {why}.")
        if n == 2 and self.num_frames < 2:
            raise FlowFactoryError(
                f"{self.name} policy option num_frames={self.num_frames}: prompt {record.text!r} gives a first and a "
                f"last frame, which needs more than one frame; try num_frames: "
                f"{1 + self.pipe.vae_scale_factor_temporal}")
        return [to_pil(t) for t in record.load_images()]

    def _image_condition(self, images: list[Image.Image]) -> torch.Tensor:
        """[1, T + C, F', h, w] float32: the pipeline's `prepare_latents` for this record's image(s) (the noise
        it takes is not used here; `noise()` draws it)."""
        vp, device = self.pipe.video_processor, self.device
        first, *rest = (vp.preprocess(im, height=self.height, width=self.width).to(device, dtype=torch.float32)
                        for im in images)
        placeholder = torch.zeros((1, *self.latent_shape), device=device)
        _, condition = self.pipe.prepare_latents(
            first, 1, self.latent_shape[0], self.height, self.width, self.num_frames, torch.float32, device,
            None, placeholder, rest[0] if rest else None)
        return condition

    @torch.no_grad()
    def encode(self, prompts: list[Prompt]) -> Conditioning:
        """Per record: the text's UMT5 states (and the negative prompt's with CFG) as `WanPolicy.encode`, the image
        condition [B, T + C, F', h, w] float32 and, for Wan 2.1, the CLIP states `image_embeds` [B, n, T, D]."""
        records = as_prompts(prompts)
        images = [self._input_images(r) for r in records]  # every record checked before any encoder runs
        cond = super().encode(records)
        cond["image_condition"] = torch.cat([self._image_condition(ims) for ims in images])
        if self.image_encoder is not None:
            cond["image_embeds"] = torch.cat(
                [self.pipe.encode_image(ims if len(ims) > 1 else ims[0], self.device)[None] for ims in images])
        return cond


def build_i2v_policy(options: WanI2VOptions, ctx: BuildContext) -> WanI2VPolicy:
    """Load or build the pipeline and wrap it as a `WanI2VPolicy` (dtypes as `flowfactory_wan.policy.build_policy`).

    max_sequence_length defaults to 512 whenever the transformer reads CLIP states through added key/value
    projections (Wan 2.1 I2V needs exactly that), the tiny preset's included."""
    from flowfactory_wan.tiny import build_tiny_i2v_pipeline

    pipe, tiny = load_or_build(options, ctx, WanImageToVideoPipeline,
                               lambda: build_tiny_i2v_pipeline(ctx.seed, experts=options.tiny_experts),
                               policy="wan-i2v", example="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers")
    clip_context = pipe.transformer.config.get("added_kv_proj_dim") is not None
    o = options.resolved(tiny, **({"max_sequence_length": TEXT_CONTEXT} if clip_context else {}))
    return WanI2VPolicy(
        pipe, height=o.height, width=o.width, num_frames=o.num_frames, max_sequence_length=o.max_sequence_length,
        guidance_scale=o.guidance_scale, guidance_scale_2=o.guidance_scale_2, negative_prompt=o.negative_prompt,
        shift=o.shift, boundary_ratio=o.boundary_ratio, **training_kwargs(o, ctx))
