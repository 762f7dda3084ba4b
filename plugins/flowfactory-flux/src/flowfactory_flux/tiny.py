"""A small random FLUX pipeline built in-process: no files, no network, deterministic from a seed.

Sized to learn on a CPU: the ~0.07M-parameter FLUX of diffusers' own tests learns no reward, while this
~7M-parameter transformer (2 double + 2 single blocks, 8 heads x 32) at 32x32 pixels with a 4-channel,
scale-1 VAE does. Tokenizers are built from in-memory vocabularies: CLIP is character-level BPE over the
byte alphabet; T5 is a Unigram over a few hundred lowercase words plus single characters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from flowfactory_diffusers.tokenizers import WORDS, clip_tokenizer, t5_tokenizer

__all__ = ["FLUX_SCHEDULER_CONFIG", "WORDS", "TinyFluxSpec", "build_tiny_kontext_pipeline", "build_tiny_pipeline",
           "clip_tokenizer", "t5_tokenizer"]

# FLUX.1's scheduler configuration (dynamic, resolution-dependent shift).
FLUX_SCHEDULER_CONFIG: dict[str, object] = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)


@dataclass(frozen=True)
class TinyFluxSpec:
    """Sizes of the tiny pipeline. The defaults give a ~7M-parameter transformer that learns on a CPU."""

    num_layers: int = 2  # double-stream (MMDiT) blocks
    num_single_layers: int = 2
    num_attention_heads: int = 8
    attention_head_dim: int = 32
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)  # sums to attention_head_dim
    guidance_embeds: bool = False  # True mimics FLUX.1-dev's distilled guidance input
    latent_channels: int = 4  # 1 can brighten but not reach most colours through a random decoder
    vae_channels: int = 16  # one block: VAE scale factor 1
    vae_norm_groups: int = 4
    vae_layers_per_block: int = 1
    vae_mid_attention: bool = False
    clip_hidden: int = 64  # also the transformer's pooled_projection_dim
    clip_layers: int = 2
    clip_heads: int = 4
    clip_max_length: int = 77
    t5_d_model: int = 64  # also the transformer's joint_attention_dim
    t5_layers: int = 2
    t5_heads: int = 4
    t5_d_kv: int = 16
    t5_d_ff: int = 128
    sample_size: int = 32  # image side in pixels (recorded in the VAE config)


def build_tiny_pipeline(seed: int, spec: TinyFluxSpec = TinyFluxSpec()) -> FluxPipeline:
    """A random FluxPipeline (float32, CPU) whose weights depend only on `seed` and `spec`.

    The global torch RNG is left as it was. The result can be `save_pretrained` and loaded back with
    `FluxPipeline.from_pretrained`.
    """
    if sum(spec.axes_dims_rope) != spec.attention_head_dim:
        raise ValueError(f"TinyFluxSpec: axes_dims_rope {spec.axes_dims_rope} must sum to attention_head_dim "
                         f"{spec.attention_head_dim}")
    tokenizer, tokenizer_2 = clip_tokenizer(spec.clip_max_length), t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * spec.latent_channels, num_layers=spec.num_layers,
            num_single_layers=spec.num_single_layers, attention_head_dim=spec.attention_head_dim,
            num_attention_heads=spec.num_attention_heads, joint_attention_dim=spec.t5_d_model,
            pooled_projection_dim=spec.clip_hidden, guidance_embeds=spec.guidance_embeds,
            axes_dims_rope=tuple(spec.axes_dims_rope),
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=spec.clip_hidden, intermediate_size=4 * spec.clip_hidden,
            num_hidden_layers=spec.clip_layers, num_attention_heads=spec.clip_heads,
            max_position_embeddings=spec.clip_max_length, projection_dim=spec.clip_hidden, hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=spec.t5_d_model, d_kv=spec.t5_d_kv, d_ff=spec.t5_d_ff,
            num_layers=spec.t5_layers, num_heads=spec.t5_heads, relative_attention_num_buckets=8,
            dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=tokenizer_2.pad_token_id,
        ))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",), block_out_channels=(spec.vae_channels,),
            layers_per_block=spec.vae_layers_per_block, latent_channels=spec.latent_channels,
            norm_num_groups=spec.vae_norm_groups, sample_size=spec.sample_size, scaling_factor=1.0,
            shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False,
            mid_block_add_attention=spec.vae_mid_attention,
        )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    for part in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        part.eval()
    return pipe


def build_tiny_kontext_pipeline(seed: int, spec: TinyFluxSpec = TinyFluxSpec()) -> FluxKontextPipeline:
    """The tiny FLUX of `build_tiny_pipeline(seed, spec)` as a FluxKontextPipeline: Kontext is the FLUX.1
    transformer reading the source image's tokens beside the latents, so the same components serve (the same
    weights, so a Kontext policy and a flux policy built from one seed share them)."""
    return FluxKontextPipeline(**build_tiny_pipeline(seed, spec).components)
