"""A small random Qwen-Image pipeline built in-process: no files, no network, deterministic from a seed.

A ~5M-parameter QwenImageTransformer2DModel (2 dual-stream blocks, 4 heads x 64) over a 4-channel, scale-1
AutoencoderKLQwenImage (latents packed 2x2 into 16 channels, as the pipeline does), conditioned by a tiny
Qwen2.5-VL (2 text layers, width 64, a one-block vision tower it never uses) with the in-memory byte-level
Qwen2 tokenizer from `flowfactory.testing.tokenizers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from flowfactory.testing.tokenizers import qwen2_tokenizer

# Qwen/Qwen-Image's scheduler configuration: exponential dynamic shift (mu from the image token count). The hub
# file cannot be read offline; these values agree with two independent public reimplementations of that scheduler.
QWEN_IMAGE_SCHEDULER_CONFIG: dict[str, object] = dict(
    base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192, max_shift=0.9,
    num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, stochastic_sampling=False,
    time_shift_type="exponential", use_beta_sigmas=False, use_dynamic_shifting=True, use_exponential_sigmas=False,
    use_karras_sigmas=False)


@dataclass(frozen=True)
class TinyQwenImageSpec:
    """Sizes of the tiny pipeline. The defaults give a ~5M-parameter transformer."""

    num_layers: int = 2
    num_attention_heads: int = 4
    attention_head_dim: int = 64
    axes_dims_rope: tuple[int, int, int] = (8, 28, 28)  # frame, height, width; sums to attention_head_dim
    latent_channels: int = 4  # VAE z_dim; the transformer sees 4 x this after 2x2 packing
    vae_base_dim: int = 16  # one stage, no downsampling: VAE scale factor 1
    sample_size: int = 32  # image side in pixels (= latent side at VAE scale 1)
    text_hidden: int = 64  # Qwen2.5-VL hidden size = the transformer's joint_attention_dim
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128


def tiny_text_encoder(spec: TinyQwenImageSpec, vocab_size: int, pad_token_id: int,
                      eos_token_id: int) -> Qwen2_5_VLForConditionalGeneration:
    """A random Qwen2.5-VL with `spec`'s text sizes and a minimal vision tower (never called for text)."""
    head_dim = spec.text_hidden // spec.text_heads
    quarter = head_dim // 4
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
            num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
            num_key_value_heads=spec.text_kv_heads, max_position_embeddings=2048, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                             "mrope_section": [quarter, quarter, head_dim // 2 - 2 * quarter]},
            pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=spec.text_hidden,
                           patch_size=2, spatial_merge_size=1, temporal_patch_size=1, window_size=4,
                           fullatt_block_indexes=[0]),
        image_token_id=vocab_size, video_token_id=vocab_size + 1, vision_start_token_id=vocab_size + 2,
        vision_end_token_id=vocab_size + 3,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_tiny_pipeline(seed: int, spec: TinyQwenImageSpec = TinyQwenImageSpec()) -> QwenImagePipeline:
    """A random QwenImagePipeline (float32, CPU) whose weights depend only on `seed` and `spec`.

    The global torch RNG is left as it was. The result can be `save_pretrained` and loaded back with
    `QwenImagePipeline.from_pretrained` (whose `prompt_template_encode_start_idx` then needs setting to this
    tokenizer's count, as the policy does).
    """
    if sum(spec.axes_dims_rope) != spec.attention_head_dim:
        raise ValueError(f"TinyQwenImageSpec: axes_dims_rope {spec.axes_dims_rope} must sum to attention_head_dim "
                         f"{spec.attention_head_dim}")
    tokenizer = qwen2_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=4 * spec.latent_channels, out_channels=spec.latent_channels,
            num_layers=spec.num_layers, attention_head_dim=spec.attention_head_dim,
            num_attention_heads=spec.num_attention_heads, joint_attention_dim=spec.text_hidden,
            guidance_embeds=False, axes_dims_rope=tuple(spec.axes_dims_rope),
        )
        text_encoder = tiny_text_encoder(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        vae = AutoencoderKLQwenImage(
            base_dim=spec.vae_base_dim, z_dim=spec.latent_channels, dim_mult=[1], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[], latents_mean=[0.0] * spec.latent_channels,
            latents_std=[1.0] * spec.latent_channels,
        )
    pipe = QwenImagePipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer,
    )
    for part in (pipe.transformer, pipe.text_encoder, pipe.vae):
        part.eval()
    return pipe
