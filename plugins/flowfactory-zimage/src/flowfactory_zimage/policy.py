"""`ZImagePolicy`: a diffusers ZImagePipeline (Z-Image-Turbo, Z-Image) seen through flowfactory's `Policy`.

What is Z-Image's own lives here: the Qwen3 encoder behind a chat template, whose penultimate hidden states of
the real (unpadded) tokens are the caption, one variable-length sequence per prompt; a single-stream transformer
that takes lists of `[C, 1, h, w]` latents and captions, a timestep of 1 - sigma, and predicts data - noise (the
negative of flowfactory's velocity); CFG as ZImagePipeline does it (on whenever guidance_scale > 0, mixed as
cond + g x (cond - uncond), optionally norm-capped and truncated at the last steps); the schedule linspace(1,
1/steps) through the scheduler's shift (static 3.0 for Z-Image-Turbo); latents `[C, h, w]` kept in float32 as
the pipeline keeps them; the VAE's scaling and shift. The math follows `ZImagePipeline.__call__`, so an ODE
rollout reproduces the pipeline's image from the same latents. LoRA, the reference view, trainable parameters
and saving are the shared `flowfactory_diffusers.policy.DiffusersPolicyBase`.
"""

from __future__ import annotations

import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas, retrieve_timesteps

from flowfactory.errors import FlowFactoryError
from flowfactory.prompts import Prompt, texts
from flowfactory.registry import BuildContext
from flowfactory.seeding import randn_per_sample
from flowfactory.types import Conditioning
from flowfactory_diffusers.policy import DiffusersPolicyBase, load_or_build, training_kwargs
from flowfactory_zimage import ZImageLoraOptions, ZImageOptions

SEQ_MULTIPLE = 32  # the transformer pads captions and images to multiples of this (diffusers' SEQ_MULTI_OF)


def pad_captions(embeds: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length caption embeddings [n_i, D] as one zero-padded [B, length, D] tensor and its 0/1 int64
    mask [B, length] (the conditioning cache stores fixed-shape rows)."""
    if not embeds:
        raise ValueError("pad_captions: no captions")
    d = embeds[0].shape[-1]
    out = embeds[0].new_zeros(len(embeds), length, d)
    mask = torch.zeros(len(embeds), length, dtype=torch.long, device=embeds[0].device)
    for i, e in enumerate(embeds):
        out[i, :e.shape[0]] = e
        mask[i, :e.shape[0]] = 1
    return out, mask


def unused_parameters(latent_shape: tuple[int, ...]) -> list[str]:
    """Transformer parameters the velocity never reads at this latent size: `x_pad_token` fills the image
    sequence up to a multiple of 32 patches, so with (h/2)(w/2) a multiple of 32 (512 px and 1024 px on Z-Image,
    the tiny preset's 32 px) it is unused. A full finetune freezes it: AdamW's weight decay would otherwise move
    a parameter that no gradient reaches."""
    _, h, w = latent_shape
    return ["x_pad_token"] if (h // 2) * (w // 2) % SEQ_MULTIPLE == 0 else []


def unpad_captions(embeds: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The rows of `pad_captions`' output without their padding: what ZImagePipeline hands the transformer."""
    keep = mask.to(embeds.device).bool()
    return [e[m] for e, m in zip(embeds, keep, strict=True)]


class ZImagePolicy(DiffusersPolicyBase):
    """Implements `flowfactory.types.Policy` for Z-Image pipelines (or the tiny preset)."""

    name = "z-image"
    lora_target_hint = ("Z-Image attention projections are to_q, to_k, to_v, to_out.0 (in layers, noise_refiner and "
                        "context_refiner); feed-forward: feed_forward.w1, feed_forward.w2, feed_forward.w3; "
                        "modulation: adaLN_modulation.0")
    encode_options = ("max_sequence_length", "negative_prompt", "do_cfg")

    def __init__(
        self,
        pipe: ZImagePipeline,
        *,
        height: int,
        width: int,
        max_sequence_length: int,
        guidance_scale: float,
        negative_prompt: str = "",
        cfg_normalization: float = 0.0,
        cfg_truncation: float = 1.0,
        lora: ZImageLoraOptions | None = None,
        gradient_checkpointing: bool = False,
        reference: bool = True,
        device: torch.device | str | None = None,
        seed: int = 0,
        offload_text_encoders: bool = False,
        vae_decode_chunk: int | None = None,
    ):
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.cfg_normalization = cfg_normalization
        self.cfg_truncation = cfg_truncation
        self.vae_scale_factor: int = pipe.vae_scale_factor
        super().__init__(pipe, height=height, width=width, max_sequence_length=max_sequence_length,
                         lora=lora, gradient_checkpointing=gradient_checkpointing, reference=reference, device=device,
                         seed=seed, offload_text_encoders=offload_text_encoders, vae_decode_chunk=vae_decode_chunk)
        if lora is None:
            for name in unused_parameters(self.latent_shape):
                getattr(pipe.transformer, name).requires_grad_(False)

    def _validate(self, pipe: ZImagePipeline) -> None:
        self._check_multiple(2 * self.vae_scale_factor, f"patch size 2 x the VAE scale factor {self.vae_scale_factor}")
        config = pipe.transformer.config
        h, w = self.height // self.vae_scale_factor, self.width // self.vae_scale_factor
        self.latent_shape: tuple[int, ...] = (config.in_channels, h, w)
        self._check_positions(config.axes_lens)

    def _check_positions(self, axes_lens: list[int]) -> None:
        """The transformer's RoPE tables cover the caption (padded to 32, plus 2 positions) on the first axis and
        the image's patches a side on the others; beyond them it would fail with an index error mid-rollout."""
        caption = -(-self.max_sequence_length // SEQ_MULTIPLE) * SEQ_MULTIPLE + 2
        if caption > axes_lens[0]:
            most = (axes_lens[0] - 2) // SEQ_MULTIPLE * SEQ_MULTIPLE
            raise FlowFactoryError(
                f"z-image policy option max_sequence_length={self.max_sequence_length}: the transformer's position "
                f"table (axes_lens[0] = {axes_lens[0]}) covers captions of at most {most} tokens; lower it")
        _, h, w = self.latent_shape
        if h // 2 > axes_lens[1] or w // 2 > axes_lens[2]:
            raise FlowFactoryError(
                f"z-image policy options height={self.height}, width={self.width}: the transformer's position table "
                f"(axes_lens {list(axes_lens[1:])}) covers at most {axes_lens[1] * 2 * self.vae_scale_factor} x "
                f"{axes_lens[2] * 2 * self.vae_scale_factor} pixels")

    @property
    def do_cfg(self) -> bool:
        """True when guidance_scale > 0 (ZImagePipeline's rule): velocity mixes a conditional and an
        unconditional pass, except at steps cut off by cfg_truncation."""
        return self.guidance_scale > 0.0

    # -- Policy protocol -------------------------------------------------------------------------------------

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`ZImagePipeline._encode_prompt` (chat template, Qwen3 penultimate hidden states of the real tokens),
        zero-padded to max_sequence_length with a 0/1 mask [B, L]."""
        embeds = self.pipe._encode_prompt(prompt=list(prompts), device=self.device,
                                          max_sequence_length=self.max_sequence_length)
        return pad_captions(embeds, self.max_sequence_length)

    @torch.no_grad()
    def encode(self, prompts: list[Prompt]) -> Conditioning:
        """The caption embeddings [B, L, D] with their mask [B, L]; with CFG also the negative prompt's, one row
        per prompt."""
        text = texts(prompts)
        with self.text_encoders():
            embeds, mask = self._encode(text)
            cond = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
            if self.do_cfg:
                neg, neg_mask = self._encode([self.negative_prompt] * len(text))
                cond |= {"negative_prompt_embeds": neg, "negative_prompt_embeds_mask": neg_mask}
        return cond

    def noise(self, generators: list[torch.Generator]) -> torch.Tensor:
        """Gaussian latents [B, C, h, w] in float32 (as ZImagePipeline.prepare_latents keeps them, whatever the
        model's dtype); row i drawn from generators[i]."""
        return randn_per_sample(self.latent_shape, generators, device=self.device, dtype=torch.float32)

    def sigmas(self, steps: int) -> torch.Tensor:
        """The pipeline's schedule: linspace(1, 1/steps) through the scheduler's shift (static for Z-Image-Turbo;
        mu from the image token count if the scheduler shifts dynamically), then 0; float32 CPU."""
        def compute() -> torch.Tensor:
            _, h, w = self.latent_shape
            retrieve_timesteps(self._scheduler, steps, "cpu", sigmas=get_default_z_image_sigmas(steps),
                               mu=self._dynamic_shift_mu((h // 2) * (w // 2)))
            return self._scheduler.sigmas

        return self._cached_sigmas(steps, compute)

    def _guided_rows(self, t: torch.Tensor) -> list[bool]:
        """Per row, whether CFG applies at timestep t (sigma x 1000): guidance on, and not truncated, where the
        pipeline truncates when (1000 - t) / 1000 > cfg_truncation (only for cfg_truncation <= 1)."""
        if not self.do_cfg:
            return [False] * t.shape[0]
        if self.cfg_truncation > 1.0:
            return [True] * t.shape[0]
        return [norm <= self.cfg_truncation for norm in ((1000 - t.float()) / 1000).tolist()]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Velocity (noise - data) at noise level sigma: the transformer's prediction, negated, CFG-mixed as
        ZImagePipeline does where guidance applies."""
        sigma = self._row_sigmas(x, sigma, f"latents of {self.height}x{self.width} images")
        dtype, device = self.compute_dtype, x.device
        t = sigma * self._scheduler.config.num_train_timesteps  # scheduler.timesteps: float32
        timestep = (1000 - t) / 1000  # the pipeline's transformer timestep: 1 - sigma
        captions = [c.to(dtype) for c in unpad_captions(cond["prompt_embeds"].to(device), cond["prompt_embeds_mask"])]
        latents = list(x.to(dtype).unsqueeze(2).unbind(0))  # [C, 1, h, w] each, as the pipeline passes them
        guided = [i for i, g in enumerate(self._guided_rows(t)) if g]
        if guided:  # one call: every conditional row, then the guided rows' negative passes, as the pipeline
            if "negative_prompt_embeds" not in cond:
                raise KeyError("z-image velocity: guidance_scale > 0 needs the negative prompt embeddings that "
                               "encode() returns; re-encode the prompts with this policy")
            negative = unpad_captions(cond["negative_prompt_embeds"].to(device), cond["negative_prompt_embeds_mask"])
            latents += [latents[i] for i in guided]
            captions += [negative[i].to(dtype) for i in guided]
            timestep = torch.cat([timestep, timestep[guided]])
        out = self._network()(latents, timestep, captions, return_dict=False)[0]
        preds = [o.float() for o in out[:x.shape[0]]]
        for k, i in enumerate(guided):
            pos, neg = preds[i], out[x.shape[0] + k].float()
            pred = pos + self.guidance_scale * (pos - neg)
            if self.cfg_normalization > 0.0:
                cap = torch.linalg.vector_norm(pos) * self.cfg_normalization
                norm = torch.linalg.vector_norm(pred)
                if norm > cap:
                    pred = pred * (cap / norm)
            preds[i] = pred
        return (-torch.stack(preds).squeeze(2)).to(x.dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents to images [B, 3, H, W] in [0, 1], float32 (unscale, unshift, VAE decode)."""
        latents = x.to(device=self.device, dtype=self.vae.dtype)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return self._vae_decode(latents, lambda image: (image.float() / 2 + 0.5).clamp(0, 1))

    @torch.no_grad()
    def encode_image(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Target images (float32 [3, h, w] in [0, 1], any size) to latents [B, C, h, w], the inverse of `decode`
        for dataset algorithms (sft, offline dpo): fitted to height x width (shorter side scaled, centre crop), the
        VAE posterior's mean, shifted and scaled as ZImageImg2ImgPipeline prepares image latents; float32 as
        `noise`."""
        from flowfactory.prompts import fit_image

        pixels = torch.stack([fit_image(im.float(), self.height, self.width) for im in images]) * 2 - 1
        mean = self.vae.encode(pixels.to(device=self.device, dtype=self.vae.dtype)).latent_dist.mean
        latents = (mean - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        return latents.to(torch.float32)

    def save(self, directory: str) -> None:
        """LoRA: diffusers LoRA file (`pipe.load_lora_weights(dir)`); full: `dir/transformer` model folder."""
        cfg = (f"negative_prompt={self.negative_prompt!r}, cfg_normalization={self.cfg_normalization}, "
               f"cfg_truncation={self.cfg_truncation}, " if self.do_cfg else "")
        self._save_with_notes(
            directory, ZImagePipeline, ZImageTransformer2DModel, "z-image",
            {"height": self.height, "width": self.width, "max_sequence_length": self.max_sequence_length,
             "guidance_scale": self.guidance_scale, "negative_prompt": self.negative_prompt,
             "cfg_normalization": self.cfg_normalization, "cfg_truncation": self.cfg_truncation},
            f"{cfg}height={self.height}, width={self.width}, max_sequence_length={self.max_sequence_length}, "
            f"guidance_scale={self.guidance_scale}")


def build_policy(options: ZImageOptions, ctx: BuildContext) -> ZImagePolicy:
    """Load or build the pipeline and wrap it as a `ZImagePolicy`.

    Frozen parts get the resolved dtype; a full finetune's transformer is float32 (master weights, mixed
    precision is Accelerate's), a LoRA's base transformer the frozen dtype.
    """
    from flowfactory_zimage.tiny import build_tiny_pipeline

    pipe, tiny = load_or_build(options, ctx, ZImagePipeline, lambda: build_tiny_pipeline(ctx.seed),
                               policy="z-image", example="Tongyi-MAI/Z-Image-Turbo")
    o = options.resolved(tiny)
    return ZImagePolicy(
        pipe, height=o.height, width=o.width, max_sequence_length=o.max_sequence_length,
        guidance_scale=o.guidance_scale, negative_prompt=o.negative_prompt, cfg_normalization=o.cfg_normalization,
        cfg_truncation=o.cfg_truncation, **training_kwargs(o, ctx))
