"""The `z-image` policy's memory plan (`ff plan`): modules on the meta device, latents, conditioning shapes."""

from __future__ import annotations

from diffusers import ZImagePipeline

from flowfactory.plan import PolicyPlan, dtype_name
from flowfactory.registry import BuildContext
from flowfactory_diffusers.plan import meta_modules, module_part, plan_parts
from flowfactory_zimage import ZImageOptions
from flowfactory_zimage.policy import ZImagePolicy, unused_parameters


def plan_policy(options: ZImageOptions, ctx: BuildContext) -> PolicyPlan:
    """What `build_policy` would hold, counted on the meta device: latents [C, h, w] in float32 (as the pipeline
    keeps them); per prompt the Qwen3 hidden states zero-padded to max_sequence_length and their int64 mask, twice
    with CFG (the negative prompt's rows)."""
    from flowfactory_zimage.tiny import build_tiny_pipeline

    modules, tiny = meta_modules(options, ctx, ZImagePipeline, lambda: build_tiny_pipeline(ctx.seed), policy="z-image")
    transformer, vae, encoder = modules["transformer"], modules["vae"], modules["text_encoder"]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)  # ZImagePipeline.vae_scale_factor
    o = options.resolved(tiny)
    height, width, max_len, guidance = o.height, o.width, o.max_sequence_length, o.guidance_scale
    latent_shape = (transformer.config.in_channels, height // scale, width // scale)
    rows = {"prompt_embeds": ((max_len, encoder.config.hidden_size), dtype_name(encoder.dtype)),
            "prompt_embeds_mask": ((max_len,), "int64")}
    conditioning = dict(rows)
    if guidance > 0.0:
        conditioning |= {f"negative_{k}": v for k, v in rows.items()}
    parts = plan_parts(modules, options, ctx, ZImagePolicy)
    unused = unused_parameters(latent_shape)
    if options.lora is None and unused:  # frozen by the policy: recount the trained transformer without them
        parts = tuple(module_part(p.name, p.role, transformer, lambda n, q: q.requires_grad and n not in unused)
                      if p.name == "transformer" else p for p in parts)
    return PolicyPlan(parts, latent_shape, "float32", (3, height, width), conditioning)
