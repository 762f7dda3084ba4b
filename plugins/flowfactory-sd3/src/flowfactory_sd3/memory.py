"""The `sd3` policy's memory plan (`ff plan`): modules on the meta device, latents, conditioning shapes."""

from __future__ import annotations

from diffusers import StableDiffusion3Pipeline

from flowfactory.plan import PolicyPlan, dtype_name
from flowfactory.registry import BuildContext
from flowfactory_diffusers.plan import meta_modules, plan_parts
from flowfactory_sd3 import SD3Options
from flowfactory_sd3.policy import SD3Policy


def plan_policy(options: SD3Options, ctx: BuildContext) -> PolicyPlan:
    """What `build_policy` would hold, counted on the meta device: latents [C, h, w] in the transformer's dtype;
    per prompt the CLIP-L/G hidden states (77 tokens, padded to T5's width) followed by T5's max_sequence_length
    tokens, and both CLIP projections; twice with CFG (the negative prompt's rows)."""
    from flowfactory_sd3.tiny import build_tiny_pipeline

    modules, tiny = meta_modules(options, ctx, StableDiffusion3Pipeline, lambda: build_tiny_pipeline(ctx.seed),
                                 policy="sd3")
    transformer, vae = modules["transformer"], modules["vae"]
    clip, clip_2, t5 = modules["text_encoder"], modules["text_encoder_2"], modules.get("text_encoder_3")
    scale = 2 ** (len(vae.config.block_out_channels) - 1)  # StableDiffusion3Pipeline.vae_scale_factor
    size = transformer.config.sample_size * scale
    o = options.resolved(tiny, **({} if tiny else {"height": size, "width": size}))
    height, width, max_len, guidance = o.height, o.width, o.max_sequence_length, o.guidance_scale
    latent_shape = (transformer.config.in_channels, height // scale, width // scale)
    width_t5 = t5.config.d_model if t5 is not None else transformer.config.joint_attention_dim
    tokens = clip.config.max_position_embeddings + max_len  # the CLIP tokenizers pad to their 77 positions
    dtype = dtype_name(clip.dtype)
    rows = {"prompt_embeds": ((tokens, width_t5), dtype),
            "pooled_prompt_embeds": ((clip.config.projection_dim + clip_2.config.projection_dim,), dtype)}
    conditioning = dict(rows)
    if guidance > 1.0:
        conditioning |= {f"negative_{k}": v for k, v in rows.items()}
    parts = plan_parts(modules, options, ctx, SD3Policy)
    return PolicyPlan(parts, latent_shape, dtype_name(transformer.dtype), (3, height, width), conditioning)
