"""The FLUX.1 policies' memory plans (`ff plan`): their modules on the meta device, latents and conditioning shapes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffusers import FluxKontextPipeline, FluxPipeline

from flowfactory.plan import PolicyPlan, dtype_name
from flowfactory.registry import BuildContext
from flowfactory_diffusers.plan import meta_modules, plan_parts
from flowfactory_flux import FluxKontextOptions, FluxOptions
from flowfactory_flux.policy import FluxPolicy


def plan_policy(options: FluxOptions, ctx: BuildContext) -> PolicyPlan:
    """What `build_policy` would hold, counted on the meta device: packed latents [(h/2)(w/2), 4C] in the
    transformer's dtype, T5 embeddings [max_sequence_length, d_model] and CLIP's pooled vector per prompt."""
    from flowfactory_flux.tiny import build_tiny_pipeline

    return _plan(options, ctx, FluxPipeline, lambda: build_tiny_pipeline(ctx.seed), "flux", FluxPolicy)


def plan_kontext_policy(options: FluxKontextOptions, ctx: BuildContext) -> PolicyPlan:
    """`plan_policy` for `build_kontext_policy`: the conditioning also holds each prompt's source latents,
    packed like the latents ([(h/2)(w/2), 4C]) in the VAE's dtype."""
    from flowfactory_flux.kontext import SOURCE_KEY, FluxKontextPolicy
    from flowfactory_flux.tiny import build_tiny_kontext_pipeline

    return _plan(options, ctx, FluxKontextPipeline, lambda: build_tiny_kontext_pipeline(ctx.seed), "flux-kontext",
                 FluxKontextPolicy, source_key=SOURCE_KEY)


def _plan(options: FluxOptions, ctx: BuildContext, pipeline_cls: type, tiny_builder: Callable[[], Any], name: str,
          policy_cls: type, source_key: str | None = None) -> PolicyPlan:
    modules, tiny = meta_modules(options, ctx, pipeline_cls, tiny_builder, policy=name)
    o = options.resolved(tiny)
    height, width, max_len = o.height, o.width, o.max_sequence_length
    transformer, vae = modules["transformer"], modules["vae"]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)  # FluxPipeline.vae_scale_factor
    h, w = height // scale, width // scale
    latent_shape = ((h // 2) * (w // 2), transformer.config.in_channels)
    latent_dtype = dtype_name(transformer.dtype)  # the base weights', before any (float32) adapter
    t5, clip = modules["text_encoder_2"], modules["text_encoder"]
    conditioning = {"prompt_embeds": ((max_len, t5.config.d_model), dtype_name(t5.dtype)),
                    "pooled_prompt_embeds": ((clip.config.hidden_size,), dtype_name(clip.dtype))}
    if source_key is not None:
        conditioning[source_key] = (latent_shape, dtype_name(vae.dtype))
    parts = plan_parts(modules, options, ctx, policy_cls)
    return PolicyPlan(parts, latent_shape, latent_dtype, (3, height, width), conditioning)
