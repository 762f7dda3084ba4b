"""A small random Wan pipeline built in-process: no files, no network, deterministic from a seed.

A 2-block WanTransformer3DModel (8 heads x 32, patch 1x2x2) over a one-level AutoencoderKLWan (2x spatial,
2x temporal, 4 latent channels normalised by mean 0 / std 1), a UMT5 encoder with the in-memory T5 Unigram
tokenizer from `flowfactory_diffusers.tokenizers`, and FlowMatchEulerDiscreteScheduler. `experts=2` adds a second
transformer and a boundary ratio, as Wan 2.2 A14B.

`build_tiny_i2v_pipeline` builds the image-to-video counterparts (`WanImageToVideoPipeline`): as Wan 2.1 I2V, a
transformer that reads the image latents beside the noise (10 input channels: 4 noise, 2 frame-mask, 4 image)
and a tiny CLIP vision encoder's states through added key/value projections; `first_last=True` adds the position
embedding of Wan 2.1 FLF2V (first and last frame); `experts=2` is Wan 2.2 I2V A14B (two experts, no image
encoder, boundary 0.9).

Sized to learn on a CPU: a 2-head x 16 transformer over Wan 2.1's 8x/4x VAE layout (2x2 latents for 16x16
pixels, 16 channels) barely moved colour-match (0.198 -> 0.203 in 40 epochs); this one, with the VAE's colour
reachable from 4 channels at 8x8 latents, goes 0.11 -> 0.19 in 150 epochs (docs/benchmarks.md). Deeper
random transformers (4 blocks) learned less in the same epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from flowfactory_diffusers.tokenizers import t5_tokenizer

TINY_BOUNDARY_RATIO = 0.875  # Wan 2.2 A14B T2V's
TINY_I2V_BOUNDARY_RATIO = 0.9  # Wan 2.2 A14B I2V's


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
    clip_dim: int = 32  # image-to-video: the CLIP vision encoder's width (Wan 2.1's ViT-H/14: 1280)
    clip_layers: int = 2
    clip_heads: int = 4
    clip_image_size: int = 32  # 32x32 crops in 8x8 patches: 16 + 1 tokens (Wan 2.1's: 224 / 14, 257 tokens)
    clip_patch_size: int = 8


def _transformer(spec: TinyWanSpec, in_channels: int | None = None, **image: int) -> WanTransformer3DModel:
    """`image`: Wan 2.1 I2V's image_dim, added_kv_proj_dim (and FLF2V's pos_embed_seq_len)."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=spec.num_attention_heads,
        attention_head_dim=spec.attention_head_dim, in_channels=in_channels or spec.latent_channels,
        out_channels=spec.latent_channels, text_dim=spec.text_dim, freq_dim=spec.freq_dim, ffn_dim=spec.ffn_dim,
        num_layers=spec.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        **image,
    )


def _text_encoder(spec: TinyWanSpec, tokenizer: object) -> UMT5EncoderModel:
    return UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=spec.text_dim, d_kv=spec.t5_d_kv, d_ff=spec.t5_d_ff,  # type: ignore[arg-type]
        num_layers=spec.t5_layers, num_heads=spec.t5_heads, relative_attention_num_buckets=8,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
    ))


def _vae(spec: TinyWanSpec) -> AutoencoderKLWan:
    levels = len(spec.vae_temporal_downsample)
    return AutoencoderKLWan(
        base_dim=spec.vae_base_dim, z_dim=spec.latent_channels, dim_mult=[1] * (levels + 1), num_res_blocks=1,
        temperal_downsample=list(spec.vae_temporal_downsample),
        latents_mean=[0.0] * spec.latent_channels, latents_std=[1.0] * spec.latent_channels,
        scale_factor_spatial=2 ** levels, scale_factor_temporal=2 ** sum(spec.vae_temporal_downsample),
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
        text_encoder = _text_encoder(spec, tokenizer)
        vae = _vae(spec)
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=spec.shift),
        transformer_2=transformer_2, boundary_ratio=TINY_BOUNDARY_RATIO if experts == 2 else None,
    )
    for part in (transformer, transformer_2, text_encoder, vae):
        if part is not None:
            part.eval()
    return pipe


def build_tiny_i2v_pipeline(seed: int, spec: TinyWanSpec = TinyWanSpec(), *, experts: int = 1,
                            first_last: bool = False) -> WanImageToVideoPipeline:
    """A random WanImageToVideoPipeline (float32, CPU) whose weights depend only on the arguments.

    experts=1: Wan 2.1 I2V-style, a tiny CLIP vision encoder (with its image processor: 32x32 centre crops)
    whose penultimate states the transformer reads; `first_last` adds FLF2V's position embedding over two
    images' states (then every record needs a first and a last frame). experts=2: Wan 2.2 I2V A14B-style, two
    experts and no image encoder. The transformer's input is the noise, the frame mask (one channel per frame
    of the VAE's temporal factor) and the image latents. The global torch RNG is left as it was; the result
    can be `save_pretrained` and loaded back with `WanImageToVideoPipeline.from_pretrained`.
    """
    if experts not in (1, 2):
        raise ValueError(f"build_tiny_i2v_pipeline: experts must be 1 or 2, got {experts}")
    if first_last and experts != 1:
        raise ValueError("build_tiny_i2v_pipeline: first_last (FLF2V's image position embedding) is a one-expert "
                         "Wan 2.1 model; Wan 2.2 takes a last frame without it")
    tokenizer = t5_tokenizer()
    temporal = 2 ** sum(spec.vae_temporal_downsample)
    in_channels = 2 * spec.latent_channels + temporal
    tokens = (spec.clip_image_size // spec.clip_patch_size) ** 2 + 1
    image: dict[str, int] = {}
    if experts == 1:
        image = dict(image_dim=spec.clip_dim, added_kv_proj_dim=spec.num_attention_heads * spec.attention_head_dim)
        if first_last:
            image["pos_embed_seq_len"] = 2 * tokens
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = _transformer(spec, in_channels, **image)
        transformer_2 = _transformer(spec, in_channels) if experts == 2 else None
        text_encoder = _text_encoder(spec, tokenizer)
        vae = _vae(spec)
        image_encoder = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=spec.clip_dim, intermediate_size=2 * spec.clip_dim, num_hidden_layers=spec.clip_layers,
            num_attention_heads=spec.clip_heads, image_size=spec.clip_image_size, patch_size=spec.clip_patch_size,
            projection_dim=spec.clip_dim,
        )) if experts == 1 else None
    # the PIL backend where transformers has one: CLIPImageProcessor itself needs torchvision, and falls back to it
    processor = getattr(transformers, "CLIPImageProcessorPil", CLIPImageProcessor)(
        size={"shortest_edge": spec.clip_image_size},
        crop_size={"height": spec.clip_image_size, "width": spec.clip_image_size},
    ) if experts == 1 else None
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=spec.shift),
        image_processor=processor, image_encoder=image_encoder, transformer_2=transformer_2,
        boundary_ratio=TINY_I2V_BOUNDARY_RATIO if experts == 2 else None,
    )
    for part in (transformer, transformer_2, text_encoder, vae, image_encoder):
        if part is not None:
            part.eval()
    return pipe
