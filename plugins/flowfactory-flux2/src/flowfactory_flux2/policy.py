"""`Flux2Policy` and `Flux2KleinPolicy`: diffusers' Flux2Pipeline and Flux2KleinPipeline seen through flowfactory's
`Policy` protocol.

What FLUX.2 shares lives in `Flux2Policy`: latents drawn already patchified ([4C, h/2, w/2]) and packed to tokens,
4-axis position ids, the empirical shift mu (from the image token count and the step count), timesteps in
[0, 1], the VAE's batch-norm statistics on decode. The variants differ in their text encoder (called through the
pipeline's own `encode_prompt`) and their guidance: FLUX.2 [dev] feeds a distilled guidance scale to the
transformer; FLUX.2 [klein] runs true CFG against the empty prompt, unless the model is step-distilled. The math
follows the pipelines' `__call__`, so an ODE rollout reproduces their image from the same latents. LoRA, the
reference view, trainable parameters and saving are the shared `flowfactory_diffusers.policy.DiffusersPolicyBase`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, retrieve_timesteps

from flowfactory.errors import FlowFactoryError
from flowfactory.prompts import Prompt, as_prompts
from flowfactory.registry import BuildContext
from flowfactory.seeding import randn_per_sample
from flowfactory.types import Conditioning
from flowfactory_diffusers.policy import DiffusersPolicyBase, load_or_build, training_kwargs
from flowfactory_flux2 import Flux2KleinOptions, Flux2LoraOptions, Flux2Options

TINY_SIZE = 32
TINY_MAX_SEQUENCE_LENGTH = 48  # the chat template and every built-in prompt (45 tokens at most) fit
REAL_MAX_SEQUENCE_LENGTH = 512  # both pipelines' default
KLEIN_GUIDANCE_SCALE = 4.0  # Flux2KleinPipeline's default
TORCHVISION_PROCESSORS = ("PixtralProcessor",)  # FLUX.2 [dev]'s tokenizer class; transformers needs torchvision for it


class Flux2Policy(DiffusersPolicyBase):
    """Implements `flowfactory.types.Policy` for FLUX.2 [dev] pipelines (or the tiny preset).

    `module` is the trainable transformer and may be replaced by the training loop with its Accelerate wrapper;
    `transformer` stays the raw diffusers model (config, adapters, saving).
    """

    name = "flux2"
    pipeline_class: ClassVar[type] = Flux2Pipeline
    lora_target_hint = ("FLUX.2 attention projections are to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, "
                        "add_v_proj, to_add_out (double-stream blocks) and to_qkv_mlp_proj (single-stream blocks; "
                        "their output is single_transformer_blocks.<i>.attn.to_out); feed-forward: ff.linear_in, "
                        "ff.linear_out, ff_context.linear_in, ff_context.linear_out")

    def __init__(
        self,
        pipe: Any,
        *,
        height: int,
        width: int,
        max_sequence_length: int,
        guidance_scale: float,
        lora: Flux2LoraOptions | None = None,
        gradient_checkpointing: bool = False,
        reference: bool = True,
        device: torch.device | str | None = None,
        seed: int = 0,
        offload_text_encoders: bool = False,
        vae_decode_chunk: int | None = None,
    ):
        self.guidance_scale = guidance_scale
        self.vae_scale_factor: int = pipe.vae_scale_factor
        self._ids: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(pipe, height=height, width=width, max_sequence_length=max_sequence_length,
                         lora=lora, gradient_checkpointing=gradient_checkpointing, reference=reference, device=device,
                         seed=seed, offload_text_encoders=offload_text_encoders, vae_decode_chunk=vae_decode_chunk)

    def _validate(self, pipe: Any) -> None:
        self._check_multiple(2 * self.vae_scale_factor,
                             f"2 x the VAE scale factor {self.vae_scale_factor}, for the 2x2 latent patches")
        h, w = self.height // (2 * self.vae_scale_factor), self.width // (2 * self.vae_scale_factor)
        self.token_hw: tuple[int, int] = (h, w)
        self.latent_channels: int = pipe.transformer.config.in_channels  # 4 x the VAE's, after patchifying
        self.latent_shape: tuple[int, ...] = (h * w, self.latent_channels)

    def to(self, device: torch.device | str) -> Flux2Policy:
        """Move every part (and the reference copy) to `device`; position ids are rebuilt there."""
        super().to(device)
        self._ids.clear()
        return self

    # -- Policy protocol -------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, prompts: list[Prompt]) -> Conditioning:
        """The pipeline's `encode_prompt`: the prompt in the model's chat template through its text encoder, three
        hidden-state layers stacked along the features, [B, max_sequence_length, 3 D]."""
        texts = self._texts(prompts)
        with self.text_encoders():
            return {"prompt_embeds": self._embed(texts)}

    def noise(self, generators: list[torch.Generator]) -> torch.Tensor:
        """Gaussian tokens [B, (h/2)(w/2), 4C]; row i drawn from generators[i] as the pipeline's prepare_latents
        draws it (already patchified, [4C, h/2, w/2]), then packed."""
        h, w = self.token_hw
        z = randn_per_sample((self.latent_channels, h, w), generators, device=self.device, dtype=torch.float32)
        return Flux2Pipeline._pack_latents(z).to(self.compute_dtype)

    def sigmas(self, steps: int) -> torch.Tensor:
        """The pipelines' schedule: linspace(1, 1/steps) through the scheduler with FLUX.2's empirical mu (from the
        image token count and `steps`), then 0; float32 CPU."""
        def compute() -> torch.Tensor:
            sched = self._scheduler
            base = None if sched.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
            retrieve_timesteps(sched, steps, "cpu", sigmas=base, mu=compute_empirical_mu(self.latent_shape[0], steps))
            return sched.sigmas

        return self._cached_sigmas(steps, compute)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Transformer velocity (noise - data) for packed latents x at noise level sigma, in x's dtype."""
        sigma = self._row_sigmas(x, sigma, f"packed latents of {self.height}x{self.width} images")
        dtype = self.compute_dtype
        # the pipelines feed scheduler.timesteps (sigma * 1000, float32) cast to the latents' dtype, over 1000
        timestep = (sigma * self._scheduler.config.num_train_timesteps).to(dtype) / 1000
        return self._guided(x.to(dtype), timestep, cond, dtype).to(x.dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Packed latents to images [B, 3, H, W] in [0, 1], float32: unpack, undo the VAE's batch-norm
        normalisation, un-patchify, VAE decode."""
        vae = self.vae
        latents = self.unpack(x.to(device=self.device, dtype=vae.dtype))
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                                latents.dtype)
        latents = Flux2Pipeline._unpatchify_latents(latents * std + mean)
        return self._vae_decode(latents, lambda image: (image.float() / 2 + 0.5).clamp(0, 1))

    def save(self, directory: str) -> None:
        """LoRA: diffusers LoRA file (`pipe.load_lora_weights(dir)`); full: `dir/transformer` model folder."""
        self._save_with_notes(
            directory, self.pipeline_class, Flux2Transformer2DModel, self.name,
            {"height": self.height, "width": self.width, "max_sequence_length": self.max_sequence_length,
             "guidance_scale": self.guidance_scale},
            f"height={self.height}, width={self.width}, max_sequence_length={self.max_sequence_length}, "
            f"guidance_scale={self.guidance_scale}", inputs="prompt=prompt")

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """Packed latents [B, (h/2)(w/2), 4C] as the patchified grid [B, 4C, h/2, w/2]: what the pipelines take as
        `latents=` (they pack it themselves) and what `decode` un-normalises."""
        h, w = self.token_hw
        return x.permute(0, 2, 1).reshape(x.shape[0], x.shape[2], h, w)

    # -- what the variants override ----------------------------------------------------------------------------

    def _embed(self, texts: list[str]) -> torch.Tensor:
        embeds, _ = self.pipe.encode_prompt(prompt=texts, device=self.device,
                                            max_sequence_length=self.max_sequence_length)
        return embeds

    def _guided(self, hidden: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                dtype: torch.dtype) -> torch.Tensor:
        """FLUX.2 [dev]: one pass with the distilled guidance scale (float32, as the pipeline builds it)."""
        guidance = torch.full((hidden.shape[0],), self.guidance_scale, device=hidden.device, dtype=torch.float32)
        return self._transformer(hidden, timestep, cond["prompt_embeds"], guidance, dtype)

    # -- helpers ---------------------------------------------------------------------------------------------

    def _texts(self, prompts: list[Prompt] | list[str]) -> list[str]:
        """The prompts' texts; a record with input images is an error (the policy is text-to-image)."""
        records = as_prompts(prompts)
        with_images = next((r for r in records if r.images), None)
        if with_images is not None:
            raise FlowFactoryError(
                f"{self.name} policy is text-to-image, but the prompt {with_images.text!r} has input images "
                f"({', '.join(p.name for p in with_images.images)}); FLUX.2's reference-image conditioning is not "
                f"supported. Remove the 'image'/'images' field from its data line.")
        return [r.text for r in records]

    def _transformer(self, hidden: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
                     guidance: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        embeds = embeds.to(device=hidden.device, dtype=dtype)
        img_ids, txt_ids = self._position_ids(embeds.shape[1], hidden.device)
        return self._network()(hidden_states=hidden, timestep=timestep, guidance=guidance,
                               encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids,
                               return_dict=False)[0]

    def _position_ids(self, txt_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(img_ids [1, (h/2)(w/2), 4], txt_ids [1, T, 4]) as the pipelines build them (int64 (t, h, w, l)
        coordinates; the transformer reads the first row), cached per text length and device."""
        key = (txt_len, str(device))
        if key not in self._ids:
            h, w = self.token_hw
            img_ids = Flux2Pipeline._prepare_latent_ids(torch.empty(1, 0, h, w)).to(device)
            txt_ids = Flux2Pipeline._prepare_text_ids(torch.empty(1, txt_len, 0)).to(device)
            self._ids[key] = (img_ids, txt_ids)
        return self._ids[key]


class Flux2KleinPolicy(Flux2Policy):
    """Implements `flowfactory.types.Policy` for FLUX.2 [klein] pipelines (base or step-distilled, or the tiny
    preset): Qwen3 text encoder, no guidance embedder, true CFG against the empty prompt when guidance_scale > 1."""

    name = "flux2-klein"
    pipeline_class = Flux2KleinPipeline
    encode_options = ("max_sequence_length", "do_cfg")

    @property
    def do_cfg(self) -> bool:
        """True when guidance_scale > 1: velocity mixes a conditional and an unconditional pass."""
        return self.guidance_scale > 1.0

    @torch.no_grad()
    def encode(self, prompts: list[Prompt]) -> Conditioning:
        """The pipeline's `encode_prompt` (Qwen3 hidden states of three layers, stacked along the features,
        [B, max_sequence_length, 3 D]); with CFG also the empty prompt's, one row per prompt, as the pipeline's
        unconditional pass uses."""
        texts = self._texts(prompts)
        with self.text_encoders():
            cond = {"prompt_embeds": self._embed(texts)}
            if self.do_cfg:
                cond["negative_prompt_embeds"] = self._embed([""] * len(texts))
        return cond

    def _guided(self, hidden: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                dtype: torch.dtype) -> torch.Tensor:
        """No guidance input; with CFG `neg + s * (cond - neg)` of a conditional and an unconditional pass."""
        out = self._transformer(hidden, timestep, cond["prompt_embeds"], None, dtype)
        if not self.do_cfg:
            return out
        if "negative_prompt_embeds" not in cond:
            raise KeyError(f"{self.name} velocity: guidance_scale > 1 needs the empty prompt's embeddings that "
                           f"encode() returns (negative_prompt_embeds); re-encode the prompts with this policy")
        neg = self._transformer(hidden, timestep, cond["negative_prompt_embeds"], None, dtype)
        return neg + self.guidance_scale * (out - neg)


def _size_defaults(pipe: Any, tiny: bool) -> tuple[int, int]:
    """(image side, max_sequence_length) when the options leave them null."""
    if tiny:
        return TINY_SIZE, TINY_MAX_SEQUENCE_LENGTH
    return pipe.default_sample_size * pipe.vae_scale_factor, REAL_MAX_SEQUENCE_LENGTH


def check_processor(options: Flux2Options) -> None:
    """FLUX.2 [dev]'s tokenizer is a PixtralProcessor, which transformers builds only with torchvision installed;
    without it diffusers fails with an unrelated-looking message, so say what to install. Reads model_index.json
    only when torchvision is missing; a model that cannot be read is left to the loader's own error."""
    if options.model is None or importlib.util.find_spec("torchvision") is not None:
        return
    path = Path(os.path.expanduser(options.model))
    try:
        index = Flux2Pipeline.load_config(str(path) if path.exists() else options.model, revision=options.revision)
    except (OSError, ValueError):
        return
    tokenizer = index.get("tokenizer")
    if isinstance(tokenizer, (list, tuple)) and len(tokenizer) == 2 and tokenizer[1] in TORCHVISION_PROCESSORS:
        raise FlowFactoryError(
            f"flux2 policy option model={options.model!r}: its tokenizer is a transformers {tokenizer[1]}, which "
            f"transformers loads only with torchvision installed; install the torchvision build that matches your "
            f"torch (pip install torchvision)")


def build_policy(options: Flux2Options, ctx: BuildContext) -> Flux2Policy:
    """Load or build the FLUX.2 [dev] pipeline and wrap it as a `Flux2Policy`.

    Frozen parts get the resolved dtype; a full finetune's transformer is float32 (master weights, mixed
    precision is Accelerate's), a LoRA's base transformer the frozen dtype.
    """
    from flowfactory_flux2.tiny import build_tiny_pipeline

    check_processor(options)
    pipe, tiny = load_or_build(options, ctx, Flux2Pipeline, lambda: build_tiny_pipeline(ctx.seed), policy="flux2",
                               example="black-forest-labs/FLUX.2-dev", gated="FLUX.2-dev is gated")
    size, max_len = _size_defaults(pipe, tiny)
    height = options.height or size
    return Flux2Policy(
        pipe, height=height, width=options.width or options.height or size,
        max_sequence_length=options.max_sequence_length or max_len, guidance_scale=options.guidance_scale,
        **training_kwargs(options, ctx))


def klein_guidance(options: Flux2KleinOptions, distilled: bool, tiny: bool) -> float:
    """The CFG scale: the option, else 1.0 (no CFG) for a distilled model or the tiny preset, 4.0 otherwise. A
    distilled model with a scale above 1 is an error (the pipeline would ignore it with a warning)."""
    scale = options.guidance_scale
    if distilled and scale is not None and scale > 1.0:
        raise FlowFactoryError(
            f"flux2-klein policy option guidance_scale={scale}: model={options.model!r} is step-distilled "
            f"(is_distilled in its model_index.json), so it runs without CFG; remove guidance_scale (or set 1.0), or "
            f"use a base model such as black-forest-labs/FLUX.2-klein-base-9B")
    if scale is not None:
        return scale
    return 1.0 if distilled or tiny else KLEIN_GUIDANCE_SCALE


def build_klein_policy(options: Flux2KleinOptions, ctx: BuildContext) -> Flux2KleinPolicy:
    """Load or build the FLUX.2 [klein] pipeline and wrap it as a `Flux2KleinPolicy` (dtypes as `build_policy`)."""
    from flowfactory_flux2.tiny import build_tiny_klein_pipeline

    pipe, tiny = load_or_build(options, ctx, Flux2KleinPipeline, lambda: build_tiny_klein_pipeline(ctx.seed),
                               policy="flux2-klein", example="black-forest-labs/FLUX.2-klein-base-9B")
    size, max_len = _size_defaults(pipe, tiny)
    height = options.height or size
    return Flux2KleinPolicy(
        pipe, height=height, width=options.width or options.height or size,
        max_sequence_length=options.max_sequence_length or max_len,
        guidance_scale=klein_guidance(options, bool(pipe.config.get("is_distilled", False)), tiny),
        **training_kwargs(options, ctx))
