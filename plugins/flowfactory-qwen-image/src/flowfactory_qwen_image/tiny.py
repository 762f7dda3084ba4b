"""Small random Qwen-Image pipelines built in-process: no files, no network, deterministic from a seed.

A ~5M-parameter QwenImageTransformer2DModel (2 dual-stream blocks, 4 heads x 64) over a 4-channel, scale-1
AutoencoderKLQwenImage (latents packed 2x2 into 16 channels, as the pipeline does), conditioned by a tiny
Qwen2.5-VL (2 text layers, width 64, a one-block vision tower the text-to-image pipeline never uses) with the
in-memory byte-level Qwen2 tokenizer from `flowfactory_diffusers.tokenizers`. The editing pipelines
(`build_tiny_edit_pipeline`) add Qwen's vision tokens to that tokenizer and a Qwen2VLProcessor matching the vision
tower.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from flowfactory_diffusers.tokenizers import QWEN_SPECIAL_TOKENS, qwen2_tokenizer

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
    vae_base_dim: int = 16
    vae_stages: int = 1  # each stage after the first halves the sides: VAE scale factor 2 ** (stages - 1)
    sample_size: int = 32  # image side in pixels (= latent side at VAE scale 1)
    text_hidden: int = 64  # Qwen2.5-VL hidden size = the transformer's joint_attention_dim
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128


def tiny_text_encoder(spec: TinyQwenImageSpec, vocab_size: int, pad_token_id: int, eos_token_id: int,
                      vision_token_ids: Mapping[str, int] | None = None) -> Qwen2_5_VLForConditionalGeneration:
    """A random Qwen2.5-VL with `spec`'s text sizes and a minimal vision tower: 2x2-pixel patches, one frame
    per patch, no merging, one block of width 16 (never called for text). `vision_token_ids` (image_token_id,
    video_token_id, vision_start_token_id, vision_end_token_id) are the tokenizer's ids of the vision tokens;
    None puts them past the vocabulary (a text-only tokenizer has none)."""
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
        **(dict(vision_token_ids) if vision_token_ids is not None else dict(
            image_token_id=vocab_size, video_token_id=vocab_size + 1, vision_start_token_id=vocab_size + 2,
            vision_end_token_id=vocab_size + 3)),
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
            base_dim=spec.vae_base_dim, z_dim=spec.latent_channels, dim_mult=[1] * spec.vae_stages, num_res_blocks=1,
            attn_scales=[], temperal_downsample=[False] * (spec.vae_stages - 1), latents_mean=[0.0] * spec.latent_channels,
            latents_std=[1.0] * spec.latent_channels,
        )
    pipe = QwenImagePipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer,
    )
    for part in (pipe.transformer, pipe.text_encoder, pipe.vae):
        part.eval()
    return pipe


# -- the editing pipelines ------------------------------------------------------------------------------------

VISION_TOKENS: tuple[str, ...] = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def qwen2_vl_tokenizer() -> Qwen2Tokenizer:
    """`flowfactory_diffusers.tokenizers.qwen2_tokenizer` with Qwen2.5-VL's vision tokens as single special tokens,
    which the processor expands (`<|image_pad|>`, once per vision token) and the text encoder looks for."""
    tokenizer = qwen2_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [*QWEN_SPECIAL_TOKENS[1:], *VISION_TOKENS]})
    return tokenizer


@dataclass(frozen=True)
class TinyQwenImageEditSpec(TinyQwenImageSpec):
    """Sizes of the tiny editing pipelines: the text-to-image sizes (a scale-1 VAE: a 32x32 input image is 256
    packed tokens; with a scale-2 VAE, 64 tokens, GRPO learned neither edit-colour nor colour-match in 20-100 CPU
    epochs, while with scale 1 colour-match rises as on the text-to-image preset), and what Qwen2.5-VL's image
    processor makes of an input image (at most `vision_max_pixels` pixels in 2x2 patches: 16 vision tokens)."""

    vision_min_pixels: int = 4 * 4
    vision_max_pixels: int = 8 * 8


def tiny_processor(tokenizer: Qwen2Tokenizer, spec: TinyQwenImageEditSpec) -> Any:
    """A Qwen2VLProcessor matching `tiny_text_encoder`'s vision tower: 2x2-pixel patches, one frame per patch, no
    merging, images resized into [vision_min_pixels, vision_max_pixels] (PIL backend: no torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from flowfactory_qwen_image.edit import vl_processor

    image_processor = Qwen2VLImageProcessorPil(patch_size=2, temporal_patch_size=1, merge_size=1,
                                               min_pixels=spec.vision_min_pixels, max_pixels=spec.vision_max_pixels)
    return vl_processor(image_processor, tokenizer)


def build_tiny_edit_pipeline(seed: int, spec: TinyQwenImageEditSpec = TinyQwenImageEditSpec(), *,
                             plus: bool = False) -> QwenImageEditPipeline | QwenImageEditPlusPipeline:
    """A random QwenImageEditPipeline (QwenImageEditPlusPipeline with `plus`), float32 on the CPU, whose weights
    depend only on `seed` and `spec`: `build_tiny_pipeline`'s transformer, VAE and text encoder, the encoder's
    vision tokens known to `qwen2_vl_tokenizer`, and `tiny_processor`. Saved with `save_pretrained`, it loads
    with the pipeline's `from_pretrained` given `processor=flowfactory_qwen_image.edit.load_processor(folder /
    "processor")` (the stock processor loader wants torchvision for videos)."""
    base = build_tiny_pipeline(seed, spec)
    tokenizer = qwen2_vl_tokenizer()
    ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                   tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)), strict=True))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)  # the text encoder's own draw: its vocabulary is larger than the base one's
        text_encoder = tiny_text_encoder(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                                         vision_token_ids=ids).eval()
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    return cls(transformer=base.transformer, scheduler=base.scheduler, vae=base.vae, text_encoder=text_encoder,
               tokenizer=tokenizer, processor=tiny_processor(tokenizer, spec))


def build_tiny_edit_plus_pipeline(seed: int, spec: TinyQwenImageEditSpec = TinyQwenImageEditSpec()) -> Any:
    """`build_tiny_edit_pipeline(seed, spec, plus=True)`."""
    return build_tiny_edit_pipeline(seed, spec, plus=True)


# -- Qwen-Image 2.1 ---------------------------------------------------------------------------------------------

# A chat template that renders messages as Qwen's does ("<|im_start|>role\ntext<|im_end|>\n"): QwenImage21Pipeline
# counts the system message's tokens with it to know how many leading hidden states to drop.
QWEN_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
                      "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
                      "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}")

# A dynamic-shift flow-matching schedule for the tiny preset (Qwen/Qwen-Image-2.1's own comes with its folder).
QWEN_IMAGE_21_TINY_SCHEDULER_CONFIG: dict[str, object] = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
    shift=1.0, time_shift_type="exponential", use_dynamic_shifting=True)


@dataclass(frozen=True)
class TinyQwenImage21Spec:
    """Sizes of the tiny Qwen-Image 2.1 pipeline. The defaults give a ~2.3M-parameter single-stream transformer over
    16 latent channels; the VAE has the pipeline's fixed 16x spatial compression (five stages), so a 64x64 image is
    4x4 latent tokens."""

    num_layers: int = 2
    num_attention_heads: int = 4
    attention_head_dim: int = 64
    axes_dims_rope: tuple[int, int, int] = (8, 28, 28)  # frame, height, width; sums to attention_head_dim
    latent_channels: int = 16  # VAE z_dim = the transformer's in/out channels (unpatched)
    vae_base_dim: int = 8
    text_hidden: int = 64  # Qwen3-VL hidden size = the transformer's context_in_dim
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128


def tiny_qwen3_vl(spec: TinyQwenImage21Spec, tokenizer: Qwen2Tokenizer) -> Any:
    """A random Qwen3-VL with `spec`'s text sizes and a one-block vision tower of 2x2-pixel patches, one frame per
    patch, no merging, knowing the tokenizer's vision tokens."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    head_dim = spec.text_hidden // spec.text_heads
    half = head_dim // 2
    ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                   tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)), strict=True))
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
            num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
            num_key_value_heads=spec.text_kv_heads, head_dim=head_dim, max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                             "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]},
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=spec.text_hidden,
                           patch_size=2, spatial_merge_size=1, temporal_patch_size=1, num_position_embeddings=16,
                           deepstack_visual_indexes=[]),
        **ids)
    return Qwen3VLForConditionalGeneration(config)


def build_tiny_qwen21_pipeline(seed: int, spec: TinyQwenImage21Spec = TinyQwenImage21Spec()) -> Any:
    """A random QwenImage21Pipeline (float32, CPU) whose weights depend only on `seed` and `spec`: the tiny
    transformer, an RGBA `AutoencoderKLQwenImage21` with 16x compression, a tiny Qwen3-VL with the byte-level
    tokenizer plus Qwen's vision tokens, and a `Qwen3VLProcessor` (no video half) carrying `QWEN_CHAT_TEMPLATE`.
    Saved with `save_pretrained`, it loads with `QwenImage21Pipeline.from_pretrained(folder,
    processor=flowfactory_qwen_image.qwen21.load_qwen21_processor(folder / "processor"))`."""
    from diffusers import AutoencoderKLQwenImage21, QwenImage21Pipeline, QwenImage21Transformer2DModel
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from flowfactory_qwen_image.edit import vl_processor

    if sum(spec.axes_dims_rope) != spec.attention_head_dim:
        raise ValueError(f"TinyQwenImage21Spec: axes_dims_rope {spec.axes_dims_rope} must sum to attention_head_dim "
                         f"{spec.attention_head_dim}")
    tokenizer = qwen2_vl_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImage21Transformer2DModel(
            in_channels=spec.latent_channels, out_channels=spec.latent_channels, num_layers=spec.num_layers,
            attention_head_dim=spec.attention_head_dim, num_attention_heads=spec.num_attention_heads,
            context_in_dim=spec.text_hidden, axes_dims_rope=tuple(spec.axes_dims_rope))
        text_encoder = tiny_qwen3_vl(spec, tokenizer)
        vae = AutoencoderKLQwenImage21(
            base_dim=spec.vae_base_dim, decoder_base_dim=spec.vae_base_dim, z_dim=spec.latent_channels,
            dim_mult=[1] * 5, num_res_blocks=1, temperal_downsample=[False] * 4,
            latents_mean=[0.0] * spec.latent_channels, latents_std=[1.0] * spec.latent_channels)
    image_processor = Qwen2VLImageProcessorPil(patch_size=2, temporal_patch_size=1, merge_size=1, min_pixels=4 * 4,
                                               max_pixels=8 * 8)
    processor = vl_processor(image_processor, tokenizer, cls=Qwen3VLProcessor, chat_template=QWEN_CHAT_TEMPLATE)
    pipe = QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_21_TINY_SCHEDULER_CONFIG), vae=vae,
        text_encoder=text_encoder, processor=processor, transformer=transformer)
    for part in (pipe.transformer, pipe.text_encoder, pipe.vae):
        part.eval()
    return pipe
