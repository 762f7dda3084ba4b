"""A small random Stable Diffusion 3 pipeline built in-process: no files, no network, deterministic from a seed.

Sized like the tiny FLUX, which learns on a CPU: a ~7M-parameter MMDiT (3 joint blocks, 8 heads x 32,
SD3.5-style RMS qk-norm and a dual-attention first block) over a 4-channel, scale-1 VAE; the transformer's
patch size 2 does the 2x2 packing. Two CLIPs with projection (pooled = both projections concatenated) and a
T5, with in-memory tokenizers from `flowfactory_diffusers.tokenizers`; CLIP pads to 16 tokens, not 77.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from flowfactory_diffusers.tokenizers import clip_tokenizer, t5_tokenizer

# SD3 / SD3.5's scheduler configuration: a static shift of 3.0.
SD3_SCHEDULER_CONFIG: dict[str, object] = dict(num_train_timesteps=1000, shift=3.0)


@dataclass(frozen=True)
class TinySD3Spec:
    """Sizes of the tiny pipeline. The defaults give a ~7M-parameter transformer."""

    num_layers: int = 3  # joint (MMDiT) blocks; the last one is context-pre-only, as in SD3
    num_attention_heads: int = 8
    attention_head_dim: int = 32
    dual_attention_layers: tuple[int, ...] = (0,)  # SD3.5 medium's extra image self-attention in early blocks
    qk_norm: str | None = "rms_norm"  # SD3.5's; None is SD3.0's
    latent_channels: int = 4
    vae_channels: int = 16  # one block: VAE scale factor 1
    vae_norm_groups: int = 4
    sample_size: int = 32  # image side in pixels (= latent side at VAE scale 1)
    pos_embed_max_size: int = 32  # latent patches per side the position table covers (up to 64 px)
    clip_hidden: int = 32  # each CLIP; pooled_projection_dim = 2 x clip_projection
    clip_projection: int = 32
    clip_layers: int = 2
    clip_heads: int = 4
    clip_max_length: int = 16
    t5_d_model: int = 96  # the transformer's joint_attention_dim; CLIP states (2 x 32) are zero-padded to it
    t5_layers: int = 2
    t5_heads: int = 4
    t5_d_kv: int = 24
    t5_d_ff: int = 128


def _clip(spec: TinySD3Spec, vocab_size: int, tokenizer) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=spec.clip_hidden, intermediate_size=4 * spec.clip_hidden,
        num_hidden_layers=spec.clip_layers, num_attention_heads=spec.clip_heads,
        max_position_embeddings=spec.clip_max_length, projection_dim=spec.clip_projection, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def build_tiny_pipeline(seed: int, spec: TinySD3Spec = TinySD3Spec()) -> StableDiffusion3Pipeline:
    """A random StableDiffusion3Pipeline (float32, CPU) whose weights depend only on `seed` and `spec`.

    The global torch RNG is left as it was. The result can be `save_pretrained` and loaded back with
    `StableDiffusion3Pipeline.from_pretrained`.
    """
    if 2 * spec.clip_hidden > spec.t5_d_model:
        raise ValueError(f"TinySD3Spec: the two CLIPs' hidden states (2 x {spec.clip_hidden}) must fit in the T5 "
                         f"width t5_d_model={spec.t5_d_model}")
    tokenizer, tokenizer_2 = clip_tokenizer(spec.clip_max_length), clip_tokenizer(spec.clip_max_length)
    tokenizer_3 = t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=spec.sample_size, patch_size=2, in_channels=spec.latent_channels,
            num_layers=spec.num_layers, attention_head_dim=spec.attention_head_dim,
            num_attention_heads=spec.num_attention_heads, joint_attention_dim=spec.t5_d_model,
            caption_projection_dim=spec.num_attention_heads * spec.attention_head_dim,
            pooled_projection_dim=2 * spec.clip_projection, out_channels=spec.latent_channels,
            pos_embed_max_size=spec.pos_embed_max_size, dual_attention_layers=tuple(spec.dual_attention_layers),
            qk_norm=spec.qk_norm,
        )
        text_encoder = _clip(spec, len(tokenizer), tokenizer)
        text_encoder_2 = _clip(spec, len(tokenizer_2), tokenizer_2)
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_3), d_model=spec.t5_d_model, d_kv=spec.t5_d_kv, d_ff=spec.t5_d_ff,
            num_layers=spec.t5_layers, num_heads=spec.t5_heads, relative_attention_num_buckets=8,
            dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=tokenizer_3.pad_token_id,
            eos_token_id=tokenizer_3.eos_token_id, decoder_start_token_id=tokenizer_3.pad_token_id,
        ))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",), block_out_channels=(spec.vae_channels,),
            layers_per_block=1, latent_channels=spec.latent_channels, norm_num_groups=spec.vae_norm_groups,
            sample_size=spec.sample_size, scaling_factor=1.0, shift_factor=0.0, use_quant_conv=False,
            use_post_quant_conv=False, mid_block_add_attention=False,
        )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    for part in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.vae):
        part.eval()
    return pipe
