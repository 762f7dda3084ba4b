"""`SD3Policy`: a diffusers StableDiffusion3Pipeline seen through flowfactory's `Policy` protocol.

What is SD3's own lives here: three text encoders (`encode_prompt`), classifier-free guidance with a negative
prompt, the scheduler's static shift, timesteps in [0, 1000], VAE scaling. Latents stay unpacked [C, h, w]:
the transformer's patch size does the packing. The math follows `StableDiffusion3Pipeline.__call__`, so an
ODE rollout reproduces the pipeline's image from the same latents. LoRA, the reference view, trainable
parameters and saving are the shared `flowfactory_diffusers.policy.DiffusersPolicyBase`.
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

from flowfactory.errors import FlowFactoryError
from flowfactory.prompts import Prompt, texts
from flowfactory.registry import BuildContext
from flowfactory.seeding import randn_per_sample
from flowfactory.types import Conditioning
from flowfactory_diffusers.policy import DiffusersPolicyBase, load_or_build, training_kwargs
from flowfactory_sd3 import LoraOptions, SD3Options


class SD3Policy(DiffusersPolicyBase):
    """Implements `flowfactory.types.Policy` for Stable Diffusion 3 / 3.5 pipelines (or the tiny preset)."""

    name = "sd3"
    lora_target_hint = ("SD3 attention projections are to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, "
                        "add_v_proj, to_add_out (SD3.5 dual-attention blocks also attn2.to_q ...; feed-forward: "
                        "ff.net.0.proj, ff.net.2, ff_context.net.0.proj, ff_context.net.2)")
    encode_options = ("max_sequence_length", "negative_prompt", "do_cfg")

    def __init__(
        self,
        pipe: StableDiffusion3Pipeline,
        *,
        height: int,
        width: int,
        max_sequence_length: int,
        guidance_scale: float,
        negative_prompt: str = "",
        lora: LoraOptions | None = None,
        gradient_checkpointing: bool = False,
        reference: bool = True,
        device: torch.device | str | None = None,
        seed: int = 0,
        offload_text_encoders: bool = False,
        vae_decode_chunk: int | None = None,
    ):
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.vae_scale_factor: int = pipe.vae_scale_factor
        super().__init__(pipe, height=height, width=width, max_sequence_length=max_sequence_length,
                         lora=lora, gradient_checkpointing=gradient_checkpointing, reference=reference, device=device,
                         seed=seed, offload_text_encoders=offload_text_encoders, vae_decode_chunk=vae_decode_chunk)

    def _validate(self, pipe: StableDiffusion3Pipeline) -> None:
        height, width, config = self.height, self.width, pipe.transformer.config
        factor = config.patch_size * self.vae_scale_factor
        self._check_multiple(factor, f"patch size {config.patch_size} x the VAE scale factor {self.vae_scale_factor}")
        largest = config.pos_embed_max_size * factor
        if max(height, width) > largest:
            raise FlowFactoryError(
                f"sd3 policy options height={height}, width={width}: the transformer's position table "
                f"(pos_embed_max_size {config.pos_embed_max_size}) covers at most {largest} pixels a side")
        self.latent_shape: tuple[int, ...] = (
            config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def _dead_modules(self, transformer: torch.nn.Module) -> list[str]:
        """The text-query projection (and its norm) of context-pre-only blocks (SD3's last): that block's text
        outputs are discarded, so these never get a gradient."""
        names = {n for n, _ in transformer.named_modules()}
        return [f"transformer_blocks.{i}.attn.{m}" for i, block in enumerate(transformer.transformer_blocks)
                if getattr(block, "context_pre_only", False) for m in ("add_q_proj", "norm_added_q")
                if f"transformer_blocks.{i}.attn.{m}" in names]

    @property
    def do_cfg(self) -> bool:
        """True when guidance_scale > 1: velocity mixes a conditional and an unconditional pass."""
        return self.guidance_scale > 1.0

    # -- Policy protocol -------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, prompts: list[Prompt]) -> Conditioning:
        """`StableDiffusion3Pipeline.encode_prompt`: CLIP-L/G hidden states (padded) + T5 sequence [B, T, D] and
        both CLIP projections [B, P]; with CFG also the negative prompt's, one row per prompt."""
        with self.text_encoders():
            embeds, neg, pooled, neg_pooled = self.pipe.encode_prompt(
                prompt=texts(prompts), prompt_2=None, prompt_3=None, device=self.device,
                do_classifier_free_guidance=self.do_cfg, negative_prompt=self.negative_prompt,
                max_sequence_length=self.max_sequence_length)
        cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if self.do_cfg:
            cond |= {"negative_prompt_embeds": neg, "negative_pooled_prompt_embeds": neg_pooled}
        return cond

    def noise(self, generators: list[torch.Generator]) -> torch.Tensor:
        """Gaussian latents [B, C, h, w]; row i drawn from generators[i], as the pipeline's prepare_latents."""
        z = randn_per_sample(self.latent_shape, generators, device=self.device, dtype=torch.float32)
        return z.to(self.compute_dtype)

    def sigmas(self, steps: int) -> torch.Tensor:
        """The scheduler's own schedule (`set_timesteps`: static shift, 3.0 for SD3.5; dynamic if configured),
        then 0; float32 CPU."""
        def compute() -> torch.Tensor:
            sched = self._scheduler
            kwargs = {}
            if sched.config.get("use_dynamic_shifting", False):
                _, h, w = self.latent_shape
                patch = self.transformer.config.patch_size
                kwargs["mu"] = self._dynamic_shift_mu((h // patch) * (w // patch), max_shift=1.16)
            retrieve_timesteps(sched, steps, "cpu", **kwargs)
            return sched.sigmas

        return self._cached_sigmas(steps, compute)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Transformer velocity (noise - data) at noise level sigma, CFG-mixed when guidance_scale > 1."""
        sigma = self._row_sigmas(x, sigma, f"latents of {self.height}x{self.width} images")
        dtype, device = self.compute_dtype, x.device
        # the pipeline feeds scheduler.timesteps = sigmas * num_train_timesteps, in float32
        timestep = sigma * self._scheduler.config.num_train_timesteps
        embeds = cond["prompt_embeds"].to(device=device, dtype=dtype)
        pooled = cond["pooled_prompt_embeds"].to(device=device, dtype=dtype)
        hidden = x.to(dtype)
        if self.do_cfg:  # one batch, unconditional rows first, as StableDiffusion3Pipeline.__call__
            if "negative_prompt_embeds" not in cond:
                raise KeyError("sd3 velocity: guidance_scale > 1 needs the negative prompt embeddings that encode() "
                               "returns; re-encode the prompts with this policy")
            embeds = torch.cat([cond["negative_prompt_embeds"].to(device=device, dtype=dtype), embeds])
            pooled = torch.cat([cond["negative_pooled_prompt_embeds"].to(device=device, dtype=dtype), pooled])
            hidden, timestep = torch.cat([hidden, hidden]), torch.cat([timestep, timestep])
        out = self._network()(hidden_states=hidden, timestep=timestep, encoder_hidden_states=embeds,
                              pooled_projections=pooled, return_dict=False)[0]
        if self.do_cfg:
            uncond, text = out.chunk(2)
            out = uncond + self.guidance_scale * (text - uncond)
        return out.to(x.dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents to images [B, 3, H, W] in [0, 1], float32 (unscale, unshift, VAE decode)."""
        latents = x / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return self._vae_decode(latents.to(device=self.device, dtype=self.vae.dtype),
                                lambda image: (image.float() / 2 + 0.5).clamp(0, 1))

    def save(self, directory: str) -> None:
        """LoRA: diffusers LoRA file (`pipe.load_lora_weights(dir)`); full: `dir/transformer` model folder."""
        self._save_with_notes(
            directory, StableDiffusion3Pipeline, SD3Transformer2DModel, "sd3",
            {"height": self.height, "width": self.width, "max_sequence_length": self.max_sequence_length,
             "guidance_scale": self.guidance_scale, "negative_prompt": self.negative_prompt},
            f"negative_prompt={self.negative_prompt!r}, height={self.height}, width={self.width}, "
            f"max_sequence_length={self.max_sequence_length}, guidance_scale={self.guidance_scale}")


def build_policy(options: SD3Options, ctx: BuildContext) -> SD3Policy:
    """Load or build the pipeline and wrap it as an `SD3Policy`.

    Frozen parts get the resolved dtype; a full finetune's transformer is float32 (master weights, mixed
    precision is Accelerate's), a LoRA's base transformer the frozen dtype.
    """
    from flowfactory_sd3.tiny import build_tiny_pipeline

    pipe, tiny = load_or_build(options, ctx, StableDiffusion3Pipeline, lambda: build_tiny_pipeline(ctx.seed),
                               policy="sd3", example="stabilityai/stable-diffusion-3.5-medium",
                               gated="SD3.5 is gated: accept its licence on the Hub")
    size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    o = options.resolved(tiny, **({} if tiny else {"height": size, "width": size}))
    return SD3Policy(pipe, height=o.height, width=o.width, max_sequence_length=o.max_sequence_length,
                     guidance_scale=o.guidance_scale, negative_prompt=o.negative_prompt, **training_kwargs(o, ctx))
