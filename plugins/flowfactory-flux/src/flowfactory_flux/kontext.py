"""`FluxKontextPolicy`: FLUX.1 Kontext image editing (diffusers FluxKontextPipeline) through the `Policy` protocol.

Kontext is the FLUX.1 transformer reading a source image beside the latents: the source is VAE-encoded (the
distribution's mode), scaled and packed like the latents, and appended to the image stream with position ids
whose first axis is 1; the velocity is the output at the latents' own tokens. Text encoding, noise, schedule
(the shift counts only the latents' tokens) and decode are FLUX.1's, inherited from `FluxPolicy`.

The source is the prompt record's input image (`Prompt.images`), resized to the run's height x width by the
pipeline's own image processor (PIL, Lanczos) and encoded once per record in `encode`, so the conditioning cache
keeps its latents. The stock pipeline given that resized image (`_auto_resize=False`, `max_area=height*width`)
computes the same thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import FluxKontextPipeline, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux_kontext import retrieve_latents

from flowfactory.errors import FlowFactoryError
from flowfactory.prompts import Prompt, as_prompts
from flowfactory.registry import BuildContext
from flowfactory.types import Conditioning
from flowfactory_diffusers.policy import load_or_build, training_kwargs
from flowfactory_flux import FluxKontextOptions
from flowfactory_flux.policy import FluxPolicy

SOURCE_KEY = "image_latents"  # the conditioning entry holding the packed source latents [B, seq, 4C]


class FluxKontextPolicy(FluxPolicy):
    """Implements `flowfactory.types.Policy` for FLUX.1 Kontext pipelines (Kontext-dev, or the tiny preset).

    `encode(prompts)` needs prompt records with exactly one input image each; its conditioning adds
    `image_latents` [B, (h/2)(w/2), 4C] (the source at the run's size) to FLUX.1's text embeddings.
    """

    name = "flux-kontext"
    # the source is resized to height x width before it is encoded, and the VAE encodes it
    encode_options = (*FluxPolicy.encode_options, "height", "width")
    encode_components = ("vae",)

    def __init__(self, pipe: FluxKontextPipeline, **kwargs: Any):
        self._joint_ids: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        super().__init__(pipe, **kwargs)

    def to(self, device: torch.device | str) -> FluxKontextPolicy:
        super().to(device)
        self._joint_ids.clear()
        return self

    @torch.no_grad()
    def encode(self, prompts: list[Prompt]) -> Conditioning:
        """FLUX.1's text conditioning plus `image_latents`: each record's input image resized to height x width
        with the pipeline's image processor, VAE-encoded (mode), shifted, scaled and packed as FluxKontextPipeline
        prepares its `image`. Each source is encoded alone, so a row depends only on its own record."""
        records = as_prompts(prompts)
        sources = [self._source(r) for r in records]  # every record is checked before anything is encoded
        cond = super().encode(records)
        cond[SOURCE_KEY] = torch.cat([self._encode_source(s) for s in sources])
        return cond

    def save(self, directory: str) -> None:
        """LoRA: diffusers LoRA file (`pipe.load_lora_weights(dir)`); full: `dir/transformer` model folder. The
        README's call passes the source as training saw it (resized to height x width, no auto-resize)."""
        h, w = self.height, self.width
        self._save_with_notes(
            directory, FluxKontextPipeline, FluxTransformer2DModel, "flux-kontext",
            {"height": h, "width": w, "max_sequence_length": self.max_sequence_length,
             "guidance_scale": self.guidance_scale, "source_size": [h, w]},
            f"height={h}, width={w}, max_area={h * w}, _auto_resize=False, "
            f"max_sequence_length={self.max_sequence_length}, guidance_scale={self.guidance_scale}",
            inputs="image=source, prompt=prompt")
        readme = Path(directory) / "README.md"
        readme.write_text(readme.read_text() + (
            f"\n`source` is the input image as a PIL image resized to {w}x{h} (`source.resize(({w}, {h}), "
            f"Image.LANCZOS)`), as it was in training; `max_area` and `_auto_resize=False` keep the pipeline from "
            f"resizing the output or the source.\n"))

    # -- helpers ---------------------------------------------------------------------------------------------

    def _source(self, record: Prompt) -> Any:
        """The record's one input image as an RGB PIL image (8-bit, as read from its file)."""
        from PIL import Image

        if len(record.images) != 1:
            has = "none" if not record.images else f"{len(record.images)}"
            raise FlowFactoryError(
                f"{self.name} policy edits one input image per prompt, but the prompt {record.text!r} has {has}: "
                f"give it exactly one ('image': 'path.png' in its .jsonl line, relative to the file)")
        pixels = record.load_images()[0]  # float32 [3, H, W] in [0, 1], from 8-bit pixels
        arr = (pixels * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(np.ascontiguousarray(arr))

    def _encode_source(self, source: Any) -> torch.Tensor:
        """One source image -> packed latents [1, seq, 4C] in the VAE's dtype."""
        processor = self.pipe.image_processor
        image = processor.preprocess(processor.resize(source, self.height, self.width), self.height, self.width)
        image = image.to(device=self.device, dtype=self.vae.dtype)
        latents = retrieve_latents(self.vae.encode(image), sample_mode="argmax")
        latents = (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        _, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, 1, c, h, w)

    def _image_tokens(self, x: torch.Tensor, cond: Conditioning,
                      img_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The latents followed by the source's tokens; the source's ids are the latents' with axis 0 set to 1."""
        source = cond.get(SOURCE_KEY)
        if source is None:
            raise FlowFactoryError(f"{self.name} velocity: the conditioning has no {SOURCE_KEY!r}; encode the prompt "
                                   f"records (with their input images) with this policy's encode")
        if tuple(source.shape[1:]) != self.latent_shape or source.shape[0] != x.shape[0]:
            raise ValueError(f"{self.name} velocity: {SOURCE_KEY} has shape {tuple(source.shape)}, expected "
                             f"({x.shape[0]}, *{self.latent_shape}) (the source at {self.height}x{self.width})")
        key = (str(x.device), x.dtype)
        if key not in self._joint_ids:
            source_ids = img_ids.clone()
            source_ids[..., 0] = 1
            self._joint_ids[key] = torch.cat([img_ids, source_ids])
        return torch.cat([x, source.to(device=x.device, dtype=x.dtype)], dim=1), self._joint_ids[key]


def build_kontext_policy(options: FluxKontextOptions, ctx: BuildContext) -> FluxKontextPolicy:
    """Load or build the Kontext pipeline and wrap it as a `FluxKontextPolicy` (dtypes as `flux`'s build)."""
    from flowfactory_flux.tiny import build_tiny_kontext_pipeline

    pipe, tiny = load_or_build(options, ctx, FluxKontextPipeline, lambda: build_tiny_kontext_pipeline(ctx.seed),
                               policy="flux-kontext", example="black-forest-labs/FLUX.1-Kontext-dev",
                               gated="FLUX.1-Kontext-dev is gated")
    o = options.resolved(tiny)
    return FluxKontextPolicy(pipe, height=o.height, width=o.width, max_sequence_length=o.max_sequence_length,
                             guidance_scale=o.guidance_scale, **training_kwargs(o, ctx))
