"""A small random Z-Image pipeline built in-process: no files, no network, deterministic from a seed.

A ~6.4M-parameter ZImageTransformer2DModel (2 single-stream blocks after 2 noise-refiner and 2 context-refiner
blocks, 8 heads x 32) over a 4-channel, scale-1 AutoencoderKL with the FLUX VAE's latent scaling and shift (the
VAE Z-Image ships), conditioned by a tiny Qwen3 (2 layers, width 64) whose tokenizer is the in-memory byte-level
Qwen2 BPE of `flowfactory_diffusers.tokenizers` with a chat template in Qwen3's format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

from flowfactory_diffusers.tokenizers import qwen2_tokenizer

__all__ = ["QWEN3_CHAT_TEMPLATE", "Z_IMAGE_TURBO_SCHEDULER_CONFIG", "TinyZImageSpec", "build_tiny_pipeline",
           "qwen3_tokenizer"]

# Z-Image-Turbo's scheduler: a static shift of 3 (no resolution-dependent shift).
Z_IMAGE_TURBO_SCHEDULER_CONFIG: dict[str, object] = dict(num_train_timesteps=1000, shift=3.0,
                                                         use_dynamic_shifting=False)

# The chat layout ZImagePipeline's `_encode_prompt` produces with Qwen3's tokenizer: a user turn, then the
# assistant turn opened (`add_generation_prompt`); with `enable_thinking=False` Qwen3 adds an empty think block,
# with True (what the pipeline passes) nothing.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def qwen3_tokenizer() -> Qwen2Tokenizer:
    """The byte-level Qwen2 tokenizer (one token per byte, Qwen's chat special tokens) with `QWEN3_CHAT_TEMPLATE`,
    so `apply_chat_template` works as on the real Qwen3 tokenizer, only with more tokens."""
    tokenizer = qwen2_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


@dataclass(frozen=True)
class TinyZImageSpec:
    """Sizes of the tiny pipeline. The defaults give a ~6.4M-parameter transformer."""

    n_layers: int = 2  # single-stream blocks over the joint image + caption sequence
    n_refiner_layers: int = 2  # noise-refiner (image) and context-refiner (caption) blocks, each
    dim: int = 256
    n_heads: int = 8
    axes_dims: tuple[int, int, int] = (8, 12, 12)  # RoPE dims of (sequence, height, width); sum to dim / n_heads
    axes_lens: tuple[int, int, int] = (1024, 128, 128)  # RoPE positions: caption tokens + 2, image tokens a side
    latent_channels: int = 4  # the VAE's z channels = the transformer's in_channels
    vae_channels: int = 16  # one block: VAE scale factor 1
    vae_norm_groups: int = 4
    scaling_factor: float = 0.3611  # Z-Image's (FLUX's) VAE latent scaling and shift
    shift_factor: float = 0.1159
    text_hidden: int = 64  # Qwen3 hidden size = the transformer's cap_feat_dim
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    sample_size: int = 32  # image side in pixels (recorded in the VAE config)


def build_tiny_pipeline(seed: int, spec: TinyZImageSpec = TinyZImageSpec()) -> ZImagePipeline:
    """A random ZImagePipeline (float32, CPU) whose weights depend only on `seed` and `spec`.

    The global torch RNG is left as it was. The result can be `save_pretrained` and loaded back with
    `ZImagePipeline.from_pretrained` (the tokenizer's chat template is saved with it).
    """
    if spec.dim % spec.n_heads or sum(spec.axes_dims) != spec.dim // spec.n_heads:
        raise ValueError(f"TinyZImageSpec: axes_dims {spec.axes_dims} must sum to the head size dim / n_heads "
                         f"({spec.dim} / {spec.n_heads})")
    tokenizer = qwen3_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=spec.latent_channels, dim=spec.dim,
            n_layers=spec.n_layers, n_refiner_layers=spec.n_refiner_layers, n_heads=spec.n_heads,
            n_kv_heads=spec.n_heads, cap_feat_dim=spec.text_hidden, axes_dims=list(spec.axes_dims),
            axes_lens=list(spec.axes_lens),
        )
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
            num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
            num_key_value_heads=spec.text_kv_heads, head_dim=spec.text_hidden // spec.text_heads,
            max_position_embeddings=2048, rms_norm_eps=1e-6, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        ))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",), block_out_channels=(spec.vae_channels,), layers_per_block=1,
            latent_channels=spec.latent_channels, norm_num_groups=spec.vae_norm_groups, sample_size=spec.sample_size,
            scaling_factor=spec.scaling_factor, shift_factor=spec.shift_factor, use_quant_conv=False,
            use_post_quant_conv=False, mid_block_add_attention=False,
        )
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**Z_IMAGE_TURBO_SCHEDULER_CONFIG), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
    )
    for part in (pipe.transformer, pipe.text_encoder, pipe.vae):
        part.eval()
    return pipe
