"""A small random Wan pipeline built in-process: no files, no network, deterministic from a seed.

A 2-block WanTransformer3DModel (8 heads x 32, patch 1x2x2) over a one-level AutoencoderKLWan (2x spatial,
2x temporal, 4 latent channels normalised by mean 0 / std 1), a UMT5 encoder with the in-memory T5 Unigram
tokenizer from `flowfactory.testing.tokenizers`, and FlowMatchEulerDiscreteScheduler. `experts=2` adds a second
transformer and a boundary ratio, as Wan 2.2 A14B.

Sized to learn on a CPU: a 2-head x 16 transformer over Wan 2.1's 8x/4x VAE layout (2x2 latents for 16x16
pixels, 16 channels) barely moved colour-match (0.198 -> 0.203 in 40 epochs); this one, with the VAE's colour
reachable from 4 channels at 8x8 latents, goes 0.11 -> 0.19 in 150 epochs (docs/benchmarks.md). Deeper
random transformers (4 blocks) learned less in the same epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from flowfactory.testing.tokenizers import t5_tokenizer

TINY_BOUNDARY_RATIO = 0.875  # Wan 2.2 A14B T2V's


@dataclass(frozen=True)
class TinyWanSpec:
    """Sizes of the tiny pipeline."""

    num_layers: int = 2
    num_attention_heads: int = 8
    attention_head_dim: int = 32
    ffn_dim: int = 512
    freq_dim: int = 32
    latent_channels: int = 4
    vae_base_dim: int = 16
    vae_temporal_downsample: tuple[bool, ...] = (True,)  # one entry per 2x spatial level; True also halves time
    text_dim: int = 32  # UMT5 d_model
    t5_layers: int = 2
    t5_heads: int = 4
    t5_d_kv: int = 8
    t5_d_ff: int = 64
    shift: float = 3.0  # the scheduler's flow shift (Wan 2.1 T2V 480p's)


def _transformer(spec: TinyWanSpec) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=spec.num_attention_heads,
        attention_head_dim=spec.attention_head_dim, in_channels=spec.latent_channels,
        out_channels=spec.latent_channels, text_dim=spec.text_dim, freq_dim=spec.freq_dim, ffn_dim=spec.ffn_dim,
        num_layers=spec.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )


def build_tiny_pipeline(seed: int, spec: TinyWanSpec = TinyWanSpec(), *, experts: int = 1) -> WanPipeline:
    """A random WanPipeline (float32, CPU) whose weights depend only on `seed`, `spec` and `experts`.

    The global torch RNG is left as it was. The result can be `save_pretrained` and loaded back with
    `WanPipeline.from_pretrained`.
    """
    if experts not in (1, 2):
        raise ValueError(f"build_tiny_pipeline: experts must be 1 or 2, got {experts}")
    tokenizer = t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = _transformer(spec)
        transformer_2 = _transformer(spec) if experts == 2 else None
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=spec.text_dim, d_kv=spec.t5_d_kv, d_ff=spec.t5_d_ff,
            num_layers=spec.t5_layers, num_heads=spec.t5_heads, relative_attention_num_buckets=8,
            dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
        ))
        levels = len(spec.vae_temporal_downsample)
        vae = AutoencoderKLWan(
            base_dim=spec.vae_base_dim, z_dim=spec.latent_channels, dim_mult=[1] * (levels + 1), num_res_blocks=1,
            temperal_downsample=list(spec.vae_temporal_downsample),
            latents_mean=[0.0] * spec.latent_channels, latents_std=[1.0] * spec.latent_channels,
            scale_factor_spatial=2 ** levels, scale_factor_temporal=2 ** sum(spec.vae_temporal_downsample),
        )
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=spec.shift),
        transformer_2=transformer_2, boundary_ratio=TINY_BOUNDARY_RATIO if experts == 2 else None,
    )
    for part in (transformer, transformer_2, text_encoder, vae):
        if part is not None:
            part.eval()
    return pipe
