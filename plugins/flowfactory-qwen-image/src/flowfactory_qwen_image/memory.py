"""The Qwen-Image policies' memory plans (`ff plan`): modules on the meta device, latents, conditioning shapes."""

from __future__ import annotations

from diffusers import QwenImagePipeline

from flowfactory.plan import PolicyPlan, dtype_name
from flowfactory.registry import BuildContext
from flowfactory_diffusers.plan import meta_modules, plan_parts
from flowfactory_qwen_image import (
    QwenImage21Options,
    QwenImageEditOptions,
    QwenImageEditPlusOptions,
    QwenImageOptions,
)
from flowfactory_qwen_image.policy import (
    REAL_MAX_SEQUENCE_LENGTH,
    REAL_TRUE_CFG_SCALE,
    TINY_MAX_SEQUENCE_LENGTH,
    TINY_SIZE,
    QwenImagePolicy,
)


def plan_policy(options: QwenImageOptions, ctx: BuildContext) -> PolicyPlan:
    """What `build_policy` would hold, counted on the meta device: packed latents [(h/2)(w/2), 4 z_dim] in the
    transformer's dtype; per prompt the Qwen2.5-VL hidden states zero-padded to max_sequence_length and their
    int64 mask, twice with true CFG (the negative prompt's rows)."""
    from flowfactory_qwen_image.tiny import build_tiny_pipeline

    modules, tiny = meta_modules(options, ctx, QwenImagePipeline, lambda: build_tiny_pipeline(ctx.seed),
                                 policy="qwen-image")
    transformer, vae, encoder = modules["transformer"], modules["vae"], modules["text_encoder"]
    scale = 2 ** len(vae.temperal_downsample)  # QwenImagePipeline.vae_scale_factor
    if tiny:
        size, max_len, cfg = TINY_SIZE, TINY_MAX_SEQUENCE_LENGTH, 1.0
    else:
        size, max_len, cfg = 128 * scale, REAL_MAX_SEQUENCE_LENGTH, REAL_TRUE_CFG_SCALE  # default_sample_size 128
    height = options.height or size
    width = options.width or options.height or size
    max_len = options.max_sequence_length or max_len
    cfg = options.true_cfg_scale if options.true_cfg_scale is not None else cfg
    h, w = height // scale, width // scale
    latent_shape = ((h // 2) * (w // 2), vae.config.z_dim * 4)
    hidden = getattr(encoder.config, "text_config", encoder.config).hidden_size
    rows = {"prompt_embeds": ((max_len, hidden), dtype_name(encoder.dtype)), "prompt_embeds_mask": ((max_len,), "int64")}
    conditioning = dict(rows)
    if cfg > 1.0:
        conditioning |= {f"negative_{k}": v for k, v in rows.items()}
    parts = plan_parts(modules, options, ctx, QwenImagePolicy)
    return PolicyPlan(parts, latent_shape, dtype_name(transformer.dtype), (3, height, width), conditioning)


def plan_edit_policy(options: QwenImageEditOptions, ctx: BuildContext) -> PolicyPlan:
    """What `build_edit_policy` would hold: the text-to-image plan's latents, and per record the Qwen2.5-VL
    conditioning padded to max_sequence_length (twice with true CFG), the input images' packed latents padded to
    `image_tokens` in the VAE's dtype, and their token grids."""
    from flowfactory_qwen_image.edit import (
        REAL_EDIT_MAX_SEQUENCE_LENGTH,
        REAL_IMAGE_AREA,
        TINY_EDIT_MAX_SEQUENCE_LENGTH,
        TINY_IMAGE_AREA,
        QwenImageEditPlusPolicy,
        QwenImageEditPolicy,
        max_image_tokens,
    )
    from flowfactory_qwen_image.tiny import build_tiny_edit_pipeline

    plus = isinstance(options, QwenImageEditPlusOptions)
    cls = QwenImageEditPlusPolicy if plus else QwenImageEditPolicy
    modules, tiny = meta_modules(options, ctx, cls.pipeline_class, lambda: build_tiny_edit_pipeline(ctx.seed, plus=plus),
                                 policy=cls.name)
    transformer, vae, encoder = modules["transformer"], modules["vae"], modules["text_encoder"]
    scale = 2 ** len(vae.temperal_downsample)
    if tiny:
        size, max_len, cfg, area = TINY_SIZE, TINY_EDIT_MAX_SEQUENCE_LENGTH, 1.0, TINY_IMAGE_AREA
    else:
        size, max_len, cfg, area = 128 * scale, REAL_EDIT_MAX_SEQUENCE_LENGTH, REAL_TRUE_CFG_SCALE, REAL_IMAGE_AREA
    height = options.height or size
    width = options.width or options.height or size
    max_len = options.max_sequence_length or max_len
    cfg = options.true_cfg_scale if options.true_cfg_scale is not None else cfg
    images = options.max_images if plus else 1
    h, w = height // scale, width // scale
    latent_shape = ((h // 2) * (w // 2), vae.config.z_dim * 4)
    hidden = getattr(encoder.config, "text_config", encoder.config).hidden_size
    rows = {"prompt_embeds": ((max_len, hidden), dtype_name(encoder.dtype)), "prompt_embeds_mask": ((max_len,), "int64")}
    conditioning = dict(rows)
    if cfg > 1.0:
        conditioning |= {f"negative_{k}": v for k, v in rows.items()}
    tokens = images * max_image_tokens(options.image_area or area, 2 * scale)
    conditioning["image_latents"] = ((tokens, vae.config.z_dim * 4), dtype_name(encoder.dtype))
    conditioning["image_shapes"] = ((images, 2), "int64")
    parts = plan_parts(modules, options, ctx, cls)
    return PolicyPlan(parts, latent_shape, dtype_name(transformer.dtype), (3, height, width), conditioning)


def plan_qwen21_policy(options: QwenImage21Options, ctx: BuildContext) -> PolicyPlan:
    """What the `qwen-image-2.1` build would hold: unpatched latents [(h/16)(w/16), C] in the transformer's dtype;
    per prompt the Qwen3-VL hidden states zero-padded to max_sequence_length and their int64 mask, twice with CFG;
    decoded samples are the RGB of the RGBA VAE."""
    from diffusers import QwenImage21Pipeline

    from flowfactory_qwen_image import qwen21
    from flowfactory_qwen_image.tiny import build_tiny_qwen21_pipeline

    modules, tiny = meta_modules(options, ctx, QwenImage21Pipeline, lambda: build_tiny_qwen21_pipeline(ctx.seed),
                                 policy=qwen21.QwenImage21Policy.name)
    transformer, encoder = modules["transformer"], modules["text_encoder"]
    size, max_len = ((qwen21.TINY_SIZE, qwen21.TINY_MAX_SEQUENCE_LENGTH) if tiny
                     else (qwen21.REAL_SIZE, qwen21.REAL_MAX_SEQUENCE_LENGTH))
    height = options.height or size
    width = options.width or options.height or size
    max_len = options.max_sequence_length or max_len
    scale = 16  # QwenImage21Pipeline.vae_scale_factor, fixed by the pipeline
    latent_shape = ((height // scale) * (width // scale), transformer.config.in_channels)
    hidden = getattr(encoder.config, "text_config", encoder.config).hidden_size
    rows = {"prompt_embeds": ((max_len, hidden), dtype_name(encoder.dtype)), "prompt_embeds_mask": ((max_len,), "int64")}
    conditioning = dict(rows)
    if options.true_cfg_scale > 1.0:
        conditioning |= {f"negative_{k}": v for k, v in rows.items()}
    parts = plan_parts(modules, options, ctx, qwen21.QwenImage21Policy)
    return PolicyPlan(parts, latent_shape, dtype_name(transformer.dtype), (3, height, width), conditioning)
