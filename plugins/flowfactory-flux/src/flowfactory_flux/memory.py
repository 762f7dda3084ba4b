"""The `flux` policy's memory plan (`ff plan`): its modules on the meta device, latents and conditioning shapes."""

from __future__ import annotations

from diffusers import FluxPipeline

from flowfactory.plan import PolicyPlan, dtype_name
from flowfactory.policies.plan import meta_modules, plan_parts
from flowfactory.registry import BuildContext
from flowfactory_flux import FluxOptions
from flowfactory_flux.policy import (
    REAL_MAX_SEQUENCE_LENGTH,
    REAL_SIZE,
    TINY_MAX_SEQUENCE_LENGTH,
    TINY_SIZE,
    FluxPolicy,
)


def plan_policy(options: FluxOptions, ctx: BuildContext) -> PolicyPlan:
    """What `build_policy` would hold, counted on the meta device: packed latents [(h/2)(w/2), 4C] in the
    transformer's dtype, T5 embeddings [max_sequence_length, d_model] and CLIP's pooled vector per prompt."""
    from flowfactory_flux.tiny import build_tiny_pipeline

    modules, tiny = meta_modules(options, ctx, FluxPipeline, lambda: build_tiny_pipeline(ctx.seed), policy="flux")
    size, max_len = (TINY_SIZE, TINY_MAX_SEQUENCE_LENGTH) if tiny else (REAL_SIZE, REAL_MAX_SEQUENCE_LENGTH)
    height, width = options.height or size, options.width or size
    max_len = options.max_sequence_length or max_len
    transformer, vae = modules["transformer"], modules["vae"]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)  # FluxPipeline.vae_scale_factor
    h, w = height // scale, width // scale
    latent_shape = ((h // 2) * (w // 2), transformer.config.in_channels)
    latent_dtype = dtype_name(transformer.dtype)  # the base weights', before any (float32) adapter
    t5, clip = modules["text_encoder_2"], modules["text_encoder"]
    conditioning = {"prompt_embeds": ((max_len, t5.config.d_model), dtype_name(t5.dtype)),
                    "pooled_prompt_embeds": ((clip.config.hidden_size,), dtype_name(clip.dtype))}
    parts = plan_parts(modules, options, ctx, FluxPolicy)
    return PolicyPlan(parts, latent_shape, latent_dtype, (3, height, width), conditioning)
