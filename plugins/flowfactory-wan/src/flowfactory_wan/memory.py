"""The wan policies' memory plans (`ff plan`): modules on the meta device, latents, conditioning shapes."""

from __future__ import annotations

from typing import Any

from diffusers import WanImageToVideoPipeline, WanPipeline

from flowfactory.plan import PolicyPlan, dtype_name
from flowfactory.registry import BuildContext
from flowfactory_diffusers.plan import meta_modules, plan_parts
from flowfactory_wan import WanI2VOptions, WanOptions
from flowfactory_wan.policy import WanPolicy


def plan_policy(options: WanOptions, ctx: BuildContext) -> PolicyPlan:
    """What `build_policy` would hold, counted on the meta device: float32 latents [C, (F-1)/t+1, h, w] (the
    policy draws and keeps them in float32); per prompt UMT5's max_sequence_length hidden states, twice with CFG
    (the negative prompt's rows); decoded videos [F, 3, H, W]. Both experts of Wan 2.2 are trained parts."""
    from flowfactory_wan.tiny import build_tiny_pipeline

    modules, tiny = meta_modules(options, ctx, WanPipeline,
                                 lambda: build_tiny_pipeline(ctx.seed, experts=options.tiny_experts), policy="wan")
    return _plan(options, ctx, modules, tiny, WanPolicy, modules["transformer"].config.in_channels)


def plan_i2v_policy(options: WanI2VOptions, ctx: BuildContext) -> PolicyPlan:
    """`plan_policy` for `wan-i2v`: latents of the VAE's channels; per record also the image condition (frame mask
    and image latents, float32) and, for Wan 2.1, the CLIP states of its image(s) (two for FLF2V)."""
    from flowfactory_wan.i2v import TEXT_CONTEXT, WanI2VPolicy
    from flowfactory_wan.tiny import build_tiny_i2v_pipeline

    modules, tiny = meta_modules(options, ctx, WanImageToVideoPipeline,
                                 lambda: build_tiny_i2v_pipeline(ctx.seed, experts=options.tiny_experts),
                                 policy="wan-i2v")
    config, vae = modules["transformer"].config, modules["vae"].config
    text = TEXT_CONTEXT if config.get("added_kv_proj_dim") is not None else None
    plan = _plan(options, ctx, modules, tiny, WanI2VPolicy, vae.z_dim, text)
    cond = dict(plan.conditioning)
    cond["image_condition"] = ((vae.scale_factor_temporal + vae.z_dim, *plan.latent_shape[1:]), "float32")
    if config.image_dim is not None and "image_encoder" in modules:
        encoder = modules["image_encoder"]
        vision = encoder.config
        tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        images = 2 if config.get("pos_embed_seq_len") else 1
        cond["image_embeds"] = ((images, tokens, vision.hidden_size), dtype_name(encoder.dtype))
    return PolicyPlan(plan.parts, plan.latent_shape, plan.latent_dtype, plan.sample_shape, cond)


def _plan(options: Any, ctx: BuildContext, modules: dict[str, Any], tiny: bool, policy_cls: type, channels: int,
          text: int | None = None) -> PolicyPlan:
    o = options.resolved(tiny, **({"max_sequence_length": text} if text else {}))
    height, width, frames, max_len, guidance = o.height, o.width, o.num_frames, o.max_sequence_length, o.guidance_scale
    vae, encoder = modules["vae"], modules["text_encoder"]
    spatial, temporal = vae.config.scale_factor_spatial, vae.config.scale_factor_temporal
    latent_shape = (channels, (frames - 1) // temporal + 1, height // spatial, width // spatial)
    rows = {"prompt_embeds": ((max_len, encoder.config.d_model), dtype_name(encoder.dtype))}
    conditioning = dict(rows)
    if guidance > 1.0 or (options.guidance_scale_2 or 0.0) > 1.0:
        conditioning["negative_prompt_embeds"] = rows["prompt_embeds"]
    parts = plan_parts(modules, options, ctx, policy_cls)
    return PolicyPlan(parts, latent_shape, "float32", (frames, 3, height, width), conditioning)
