"""The FLUX.2 policies' memory plan (`ff plan`): modules on the meta device, latents and conditioning shapes."""

from __future__ import annotations

import os
from pathlib import Path

from diffusers import Flux2KleinPipeline, Flux2Pipeline

from flowfactory.plan import PolicyPlan, dtype_name
from flowfactory.registry import BuildContext
from flowfactory_diffusers.plan import meta_modules, plan_parts
from flowfactory_flux2 import Flux2KleinOptions, Flux2Options
from flowfactory_flux2.policy import (
    REAL_MAX_SEQUENCE_LENGTH,
    TINY_MAX_SEQUENCE_LENGTH,
    TINY_SIZE,
    Flux2KleinPolicy,
    Flux2Policy,
    klein_guidance,
)

DEFAULT_SAMPLE_SIZE = 128  # both pipelines' default_sample_size (latent pixels), times the VAE scale: 1024 px
STACKED_LAYERS = 3  # both pipelines stack three hidden-state layers of their text encoder


def plan_policy(options: Flux2Options | Flux2KleinOptions, ctx: BuildContext, *, klein: bool) -> PolicyPlan:
    """What the build would hold, counted on the meta device: packed latents [(h/16)(w/16), 4 C] in the transformer's
    dtype (FLUX.2's VAE scale 8 and 2x2 patches); per prompt the text encoder's three stacked layers
    [max_sequence_length, 3 D], twice for klein with CFG (the empty prompt's rows)."""
    from flowfactory_flux2.tiny import build_tiny_klein_pipeline, build_tiny_pipeline

    pipeline_cls, policy_cls, tiny_builder = ((Flux2KleinPipeline, Flux2KleinPolicy, build_tiny_klein_pipeline)
                                              if klein else (Flux2Pipeline, Flux2Policy, build_tiny_pipeline))
    modules, tiny = meta_modules(options, ctx, pipeline_cls, lambda: tiny_builder(ctx.seed), policy=policy_cls.name)
    transformer, vae, encoder = modules["transformer"], modules["vae"], modules["text_encoder"]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)  # the pipelines' vae_scale_factor
    size, max_len = (TINY_SIZE, TINY_MAX_SEQUENCE_LENGTH) if tiny else (DEFAULT_SAMPLE_SIZE * scale,
                                                                         REAL_MAX_SEQUENCE_LENGTH)
    height = options.height or size
    width = options.width or options.height or size
    max_len = options.max_sequence_length or max_len
    latent_shape = ((height // (2 * scale)) * (width // (2 * scale)), transformer.config.in_channels)
    hidden = getattr(encoder.config, "text_config", encoder.config).hidden_size
    rows = {"prompt_embeds": ((max_len, STACKED_LAYERS * hidden), dtype_name(encoder.dtype))}
    if klein and klein_guidance(options, _distilled(options, pipeline_cls), tiny) > 1.0:
        rows["negative_prompt_embeds"] = rows["prompt_embeds"]
    parts = plan_parts(modules, options, ctx, policy_cls)
    return PolicyPlan(parts, latent_shape, dtype_name(transformer.dtype), (3, height, width), rows)


def _distilled(options: Flux2Options | Flux2KleinOptions, pipeline_cls: type) -> bool:
    """The `is_distilled` flag of the model's model_index.json (False for the tiny preset); `meta_modules` has
    already read that file, so a bad `model` failed there with its own error."""
    if options.model is None:
        return False
    path = Path(os.path.expanduser(options.model))
    index = pipeline_cls.load_config(str(path) if path.exists() else options.model, revision=options.revision)
    return bool(index.get("is_distilled", False))
