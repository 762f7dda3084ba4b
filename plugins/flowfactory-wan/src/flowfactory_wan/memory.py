"""The `wan` policy's memory plan (`ff plan`): modules on the meta device, latents, conditioning shapes."""

from __future__ import annotations

from diffusers import WanPipeline

from flowfactory.plan import PolicyPlan, dtype_name
from flowfactory.policies.plan import meta_modules, plan_parts
from flowfactory.registry import BuildContext
from flowfactory_wan import WanOptions
from flowfactory_wan.policy import REAL, TINY, WanPolicy


def plan_policy(options: WanOptions, ctx: BuildContext) -> PolicyPlan:
    """What `build_policy` would hold, counted on the meta device: float32 latents [C, (F-1)/t+1, h, w] (the
    policy draws and keeps them in float32); per prompt UMT5's max_sequence_length hidden states, twice with CFG
    (the negative prompt's rows); decoded videos [F, 3, H, W]. Both experts of Wan 2.2 are trained parts."""
    from flowfactory_wan.tiny import build_tiny_pipeline

    modules, tiny = meta_modules(options, ctx, WanPipeline,
                                 lambda: build_tiny_pipeline(ctx.seed, experts=options.tiny_experts), policy="wan")
    defaults = TINY if tiny else REAL
    height, width = options.height or int(defaults["height"]), options.width or int(defaults["width"])
    frames = options.num_frames or int(defaults["num_frames"])
    max_len = options.max_sequence_length or int(defaults["max_sequence_length"])
    guidance = options.guidance_scale if options.guidance_scale is not None else float(defaults["guidance_scale"])
    transformer, vae, encoder = modules["transformer"], modules["vae"], modules["text_encoder"]
    spatial, temporal = vae.config.scale_factor_spatial, vae.config.scale_factor_temporal
    latent_shape = (transformer.config.in_channels, (frames - 1) // temporal + 1, height // spatial, width // spatial)
    rows = {"prompt_embeds": ((max_len, encoder.config.d_model), dtype_name(encoder.dtype))}
    conditioning = dict(rows)
    if guidance > 1.0 or (options.guidance_scale_2 or 0.0) > 1.0:
        conditioning["negative_prompt_embeds"] = rows["prompt_embeds"]
    parts = plan_parts(modules, options, ctx, WanPolicy)
    return PolicyPlan(parts, latent_shape, "float32", (frames, 3, height, width), conditioning)
