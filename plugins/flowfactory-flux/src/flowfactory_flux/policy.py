"""`FluxPolicy`: a diffusers FluxPipeline seen through flowfactory's `Policy` protocol.

Everything model-specific lives here: 2x2 latent packing, the rotary position ids, distilled guidance,
the resolution-dependent sigma shift, VAE scaling. The math follows `FluxPipeline.__call__` step for step,
so an ODE rollout of this policy reproduces the pipeline's image from the same latents.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

from flowfactory.prompts import Prompt, texts
from flowfactory.registry import BuildContext
from flowfactory.seeding import randn_per_sample
from flowfactory.types import Conditioning
from flowfactory_diffusers.policy import DiffusersPolicyBase, load_or_build, training_kwargs
from flowfactory_flux import FluxOptions, LoraOptions


class FluxPolicy(DiffusersPolicyBase):
    """Implements `flowfactory.types.Policy` for FLUX.1 pipelines (dev, schnell, or the tiny preset).

    `module` is the trainable transformer and may be replaced by the training loop with its Accelerate
    wrapper; `transformer` stays the raw diffusers model (config, adapters, saving). LoRA, the reference
    view, trainable parameters and saving come from `flowfactory_diffusers.policy.DiffusersPolicyBase`.
    """

    name = "flux"
    lora_target_hint = ("FLUX attention projections are to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, "
                        "add_v_proj, to_add_out (feed-forward: ff.net.0.proj, ff.net.2, proj_mlp, proj_out)")

    def __init__(
        self,
        pipe: FluxPipeline,
        *,
        height: int,
        width: int,
        max_sequence_length: int,
        guidance_scale: float,
        lora: LoraOptions | None,
        gradient_checkpointing: bool = False,
        reference: bool = True,
        device: torch.device | str | None = None,
        seed: int = 0,
        offload_text_encoders: bool = False,
        vae_decode_chunk: int | None = None,
    ):
        self._ids: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.guidance_scale = guidance_scale
        self.guidance_embeds = bool(pipe.transformer.config.guidance_embeds)
        self.vae_scale_factor: int = pipe.vae_scale_factor
        super().__init__(pipe, height=height, width=width, max_sequence_length=max_sequence_length,
                         lora=lora, gradient_checkpointing=gradient_checkpointing, reference=reference, device=device,
                         seed=seed, offload_text_encoders=offload_text_encoders, vae_decode_chunk=vae_decode_chunk)

    def _validate(self, pipe: FluxPipeline) -> None:
        self._check_multiple(2 * self.vae_scale_factor,
                             f"2 x the VAE scale factor {self.vae_scale_factor}, for the 2x2 latent packing")
        channels = pipe.transformer.config.in_channels // 4
        self._unpacked_shape = (channels, self.height // self.vae_scale_factor, self.width // self.vae_scale_factor)
        c, h, w = self._unpacked_shape
        self.latent_shape: tuple[int, ...] = ((h // 2) * (w // 2), c * 4)

    # -- setup -----------------------------------------------------------------------------------------------

    def to(self, device: torch.device | str) -> FluxPolicy:
        """Move every part (and the reference copy) to `device`; position ids are rebuilt there."""
        super().to(device)
        self._ids.clear()
        return self

    # -- Policy protocol -------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, prompts: list[Prompt]) -> Conditioning:
        """T5 sequence embeddings [B, T, D] and CLIP pooled embeddings [B, P], as FluxPipeline.encode_prompt."""
        with self.text_encoders():
            prompt_embeds, pooled, _ = self.pipe.encode_prompt(
                prompt=texts(prompts), prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def noise(self, generators: list[torch.Generator]) -> torch.Tensor:
        """Packed Gaussian latents [B, seq, 4C]; row i is drawn unpacked ([C, h, w]) from generators[i]."""
        c, h, w = self._unpacked_shape
        z = randn_per_sample((c, h, w), generators, device=self.device, dtype=torch.float32)
        return FluxPipeline._pack_latents(z, z.shape[0], c, h, w).to(self.compute_dtype)

    def sigmas(self, steps: int) -> torch.Tensor:
        """FluxPipeline's schedule: linspace(1, 1/steps) shifted by mu(image tokens), then 0; float32 CPU."""
        def compute() -> torch.Tensor:
            sched = self._scheduler
            base = None if sched.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
            retrieve_timesteps(sched, steps, "cpu", sigmas=base, mu=self._dynamic_shift_mu(self.latent_shape[0]))
            return sched.sigmas

        return self._cached_sigmas(steps, compute)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Transformer velocity (noise - data) for packed latents x at noise level sigma, in x's dtype."""
        sigma = self._row_sigmas(x, sigma, f"packed latents of {self.height}x{self.width} images")
        b, dtype, device = x.shape[0], self.compute_dtype, x.device
        timestep = sigma.to(dtype)
        prompt_embeds = cond["prompt_embeds"].to(device=device, dtype=dtype)
        pooled = cond["pooled_prompt_embeds"].to(device=device, dtype=dtype)
        img_ids, txt_ids = self._position_ids(prompt_embeds.shape[1], device, dtype)
        hidden, img_ids = self._image_tokens(x.to(dtype), cond, img_ids)
        guidance = (torch.full((b,), self.guidance_scale, device=device, dtype=torch.float32)
                    if self.guidance_embeds else None)
        out = self._network()(hidden_states=hidden, timestep=timestep, guidance=guidance, pooled_projections=pooled,
                  encoder_hidden_states=prompt_embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return out[:, :x.shape[1]].to(x.dtype)  # the latents' own tokens (an editing model appended its source's)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Packed latents to images [B, 3, H, W] in [0, 1], float32 (unpack, unscale, VAE decode)."""
        latents = FluxPipeline._unpack_latents(x, self.height, self.width, self.vae_scale_factor)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return self._vae_decode(latents.to(device=self.device, dtype=self.vae.dtype),
                                lambda image: (image.float() / 2 + 0.5).clamp(0, 1))

    @torch.no_grad()
    def encode_image(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Target images (float32 [3, h, w] in [0, 1], any size) to packed latents [B, seq, 4C], the inverse of
        `decode`: fitted to height x width (shorter side scaled, centre crop), the VAE posterior's mean, shifted and
        scaled as FluxPipeline's latents, packed."""
        from diffusers.pipelines.flux.pipeline_flux_img2img import retrieve_latents

        from flowfactory.prompts import fit_image

        pixels = torch.stack([fit_image(im.float(), self.height, self.width) for im in images]) * 2 - 1
        latents = retrieve_latents(self.vae.encode(pixels.to(device=self.device, dtype=self.vae.dtype)),
                                   sample_mode="argmax")
        latents = (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        b, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, b, c, h, w).to(self.compute_dtype)

    def save(self, directory: str) -> None:
        """LoRA: diffusers LoRA file (`pipe.load_lora_weights(dir)`); full: `dir/transformer` model folder."""
        self._save_with_notes(
            directory, FluxPipeline, FluxTransformer2DModel, "flux",
            {"height": self.height, "width": self.width, "max_sequence_length": self.max_sequence_length,
             "guidance_scale": self.guidance_scale},
            f"height={self.height}, width={self.width}, max_sequence_length={self.max_sequence_length}, "
            f"guidance_scale={self.guidance_scale}")

    # -- helpers ---------------------------------------------------------------------------------------------

    def _image_tokens(self, x: torch.Tensor, cond: Conditioning,
                      img_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's image-stream input and its position ids: the packed latents alone for FLUX.1; an
        image-conditioned variant (Kontext) appends its source image's tokens and their ids."""
        return x, img_ids

    def _position_ids(self, txt_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(img_ids [seq, 3], txt_ids [T, 3]) as FluxPipeline builds them, cached per shape/device/dtype."""
        key = (txt_len, str(device), dtype)
        if key not in self._ids:
            _, h, w = self._unpacked_shape
            img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)
            txt_ids = torch.zeros(txt_len, 3, device=device, dtype=dtype)
            self._ids[key] = (img_ids, txt_ids)
        return self._ids[key]


def build_policy(options: FluxOptions, ctx: BuildContext) -> FluxPolicy:
    """Load or build the pipeline and wrap it as a `FluxPolicy`.

    Frozen parts get the resolved dtype; a full finetune's transformer is float32 (master weights, mixed
    precision is Accelerate's), a LoRA's base transformer the frozen dtype.
    """
    from flowfactory_flux.tiny import build_tiny_pipeline

    pipe, tiny = load_or_build(options, ctx, FluxPipeline, lambda: build_tiny_pipeline(ctx.seed), policy="flux",
                               example="black-forest-labs/FLUX.1-dev", gated="FLUX.1-dev is gated")
    o = options.resolved(tiny)
    return FluxPolicy(pipe, height=o.height, width=o.width, max_sequence_length=o.max_sequence_length,
                      guidance_scale=o.guidance_scale, **training_kwargs(o, ctx))
