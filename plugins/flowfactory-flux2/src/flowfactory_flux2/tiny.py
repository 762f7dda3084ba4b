"""Small random FLUX.2 pipelines built in-process: no files, no network, deterministic from a seed.

Both share a ~6.5M-parameter Flux2Transformer2DModel (2 double + 2 single blocks, 8 heads x 32, as the tiny FLUX.1
that learns on a CPU) over a 4-channel, scale-1 AutoencoderKLFlux2 (latents patchified 2x2 into 16 channels, as
the pipelines do) whose batch-norm statistics are random, so de-normalising the latents is not the identity.

- FLUX.2 [dev] (`build_tiny_pipeline`): a narrow Mistral3ForConditionalGeneration (31 text layers, width 32, a
  one-layer Pixtral vision tower it never uses), deep enough for the hidden states Flux2Pipeline reads (layers
  10, 20, 30), so the pipeline's defaults hold. Its tokenizer is a word-level Unigram over flowfactory's prompt
  words and the words of Flux2Pipeline's system message, with a Mistral-style chat template: the real model's
  PixtralProcessor needs torchvision, and for text-only prompts the pipeline uses only its chat template and
  tokenizer, which a tokenizer provides alike.
- FLUX.2 [klein] (`build_tiny_klein_pipeline`): a narrow Qwen3ForCausalLM (28 layers: Flux2KleinPipeline reads
  9, 18, 27) with the in-memory byte-level Qwen2 tokenizer of `flowfactory_diffusers.tokenizers` and a ChatML
  template that honours `enable_thinking=False`; not step-distilled (`is_distilled=False`), so CFG can be tested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from flowfactory_diffusers.tokenizers import WORDS, qwen2_tokenizer

__all__ = ["FLUX2_SCHEDULER_CONFIG", "TinyFlux2Spec", "build_tiny_klein_pipeline", "build_tiny_pipeline",
           "klein_tokenizer", "mistral_tokenizer"]

# Dynamic shifting on: both pipelines pass their own empirical mu (from the image token count and the step count),
# so the base/max shift values below, FLUX.1's, are never used.
FLUX2_SCHEDULER_CONFIG: dict[str, object] = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)

# Mistral-style chat template (system prompt, then instructions), rendering content given as a string or as a list of
# typed parts, as Flux2Pipeline's `format_input` builds it.
MISTRAL_SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]",
                                           "[/SYSTEM_PROMPT]")
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)

# ChatML, as Qwen3's template renders a user turn; with enable_thinking=False the assistant turn opens with an empty
# thinking block.
KLEIN_THINK_TOKENS: tuple[str, ...] = ("<think>", "</think>")
KLEIN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@dataclass(frozen=True)
class TinyFlux2Spec:
    """Sizes of a tiny FLUX.2 pipeline. The defaults give a ~6.5M-parameter transformer."""

    num_layers: int = 2  # double-stream blocks
    num_single_layers: int = 2
    num_attention_heads: int = 8
    attention_head_dim: int = 32
    axes_dims_rope: tuple[int, int, int, int] = (8, 8, 8, 8)  # time, height, width, sequence; sum = head dim
    guidance_embeds: bool = True  # FLUX.2 [dev] is guidance-distilled; the klein builder turns it off
    latent_channels: int = 4  # VAE channels; the transformer sees 4 x this after 2x2 patchifying
    vae_channels: int = 16  # one block: VAE scale factor 1
    vae_norm_groups: int = 4
    sample_size: int = 32  # image side in pixels (recorded in the VAE config)
    text_hidden: int = 32  # text encoder width; the transformer's joint_attention_dim is 3 x this (three layers)
    text_layers: int | None = None  # null: just deep enough for the pipeline's default layers (31 dev, 28 klein)
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 64


def mistral_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level Unigram tokenizer (Metaspace) over flowfactory's prompt words and the words of Flux2Pipeline's
    system message, then single characters, with Mistral's special tokens and a Mistral-style chat template: the
    system message is ~40 tokens instead of hundreds of characters, so a short `max_sequence_length` keeps the
    prompt."""
    words = dict.fromkeys([*WORDS, *re.findall(r"[A-Za-z]+", SYSTEM_MESSAGE)])
    pieces: list[tuple[str, float]] = [(t, 0.0) for t in MISTRAL_SPECIAL_TOKENS] + [("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    for word in words:
        if "\u2581" + word not in seen:
            pieces.append(("\u2581" + word, -4.0))
            seen.add("\u2581" + word)
    for ch in [*sorted(ByteLevel.alphabet()), "\n"]:
        if ch not in seen:
            pieces.append((ch, -10.0))
            seen.add(ch)
    backend = Tokenizer(models.Unigram(pieces, unk_id=0))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=list(MISTRAL_SPECIAL_TOKENS[4:]), chat_template=MISTRAL_CHAT_TEMPLATE,
        model_max_length=512)


def klein_tokenizer() -> Qwen2Tokenizer:
    """The byte-level Qwen2 tokenizer of `flowfactory_diffusers.tokenizers` with Qwen3's thinking tokens and a ChatML
    template."""
    tokenizer = qwen2_tokenizer()
    tokenizer.add_tokens(list(KLEIN_THINK_TOKENS), special_tokens=True)
    tokenizer.chat_template = KLEIN_CHAT_TEMPLATE
    return tokenizer


def _transformer(spec: TinyFlux2Spec, guidance_embeds: bool) -> Flux2Transformer2DModel:
    if sum(spec.axes_dims_rope) != spec.attention_head_dim:
        raise ValueError(f"TinyFlux2Spec: axes_dims_rope {spec.axes_dims_rope} must sum to attention_head_dim "
                         f"{spec.attention_head_dim}")
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * spec.latent_channels, num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers, attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads, joint_attention_dim=3 * spec.text_hidden,
        axes_dims_rope=tuple(spec.axes_dims_rope), guidance_embeds=guidance_embeds)


def _unit_embeddings(text_encoder: torch.nn.Module) -> None:
    """Redraw the token embeddings with std 1 (the default init is 0.02). The pipelines read intermediate hidden
    states, which no final norm rescales: with 0.02 embeddings a prompt moves the tiny transformer's velocity by
    ~1e-3 and a reward that depends on the prompt is barely learnable; a trained encoder's states are larger still."""
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.normal_(0.0, 1.0)


def _vae(spec: TinyFlux2Spec) -> AutoencoderKLFlux2:
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(spec.vae_channels,), layers_per_block=1, latent_channels=spec.latent_channels,
        norm_num_groups=spec.vae_norm_groups, sample_size=spec.sample_size, use_quant_conv=False,
        use_post_quant_conv=False, mid_block_add_attention=False)
    with torch.no_grad():  # random latent statistics (drawn from the builder's seeded RNG)
        vae.bn.running_mean.normal_(0.0, 0.2)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def build_tiny_pipeline(seed: int, spec: TinyFlux2Spec = TinyFlux2Spec()) -> Flux2Pipeline:
    """A random Flux2Pipeline (float32, CPU) whose weights depend only on `seed` and `spec`.

    The global torch RNG is left as it was. The result can be `save_pretrained` and loaded back with
    `Flux2Pipeline.from_pretrained`.
    """
    tokenizer = mistral_tokenizer()
    head_dim = spec.text_hidden // spec.text_heads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = _transformer(spec, spec.guidance_embeds)
        text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config=dict(
                vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
                num_hidden_layers=spec.text_layers or 31, num_attention_heads=spec.text_heads,
                num_key_value_heads=spec.text_kv_heads, head_dim=head_dim, max_position_embeddings=2048,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id),
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               head_dim=8, image_size=28, patch_size=14),
            image_token_index=tokenizer.unk_token_id, spatial_merge_size=1))
        _unit_embeddings(text_encoder)
        vae = _vae(spec)
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG), vae=vae,
                         text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    for part in (pipe.transformer, pipe.text_encoder, pipe.vae):
        part.eval()
    return pipe


def build_tiny_klein_pipeline(seed: int, spec: TinyFlux2Spec = TinyFlux2Spec()) -> Flux2KleinPipeline:
    """A random Flux2KleinPipeline (float32, CPU, not step-distilled) whose weights depend only on `seed` and `spec`;
    its transformer has no guidance embedder (klein takes none). The global torch RNG is left as it was."""
    tokenizer = klein_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = _transformer(spec, guidance_embeds=False)
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
            num_hidden_layers=spec.text_layers or 28, num_attention_heads=spec.text_heads,
            num_key_value_heads=spec.text_kv_heads, head_dim=spec.text_hidden // spec.text_heads,
            max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=None))
        _unit_embeddings(text_encoder)
        vae = _vae(spec)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG), vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                              is_distilled=False)
    for part in (pipe.transformer, pipe.text_encoder, pipe.vae):
        part.eval()
    return pipe
