"""`QwenImagePolicy`: a diffusers QwenImagePipeline seen through flowfactory's `Policy` protocol.

What is Qwen-Image's own lives here: the Qwen2.5-VL text encoder behind a chat template whose system prefix is
dropped (its token count recomputed for the tokenizer actually loaded), true CFG with a negative prompt and
norm rescaling, the scheduler's dynamic (exponential) shift from the image token count, 2x2-packed latents,
timesteps in [0, 1], the VAE's per-channel latent statistics. The math follows `QwenImagePipeline.__call__`, so
an ODE rollout reproduces the pipeline's image from the same latents. LoRA, the reference view, trainable
parameters and saving are the shared `flowfactory_diffusers.policy.DiffusersPolicyBase`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from diffusers.pipelines.qwenimage.pipeline_qwenimage import retrieve_timesteps

from flowfactory.prompts import Prompt, texts
from flowfactory.registry import BuildContext
from flowfactory.seeding import randn_per_sample
from flowfactory.types import Conditioning
from flowfactory_diffusers.policy import DiffusersPolicyBase, load_or_build, training_kwargs
from flowfactory_qwen_image import LoraOptions, QwenImageOptions

TINY_SIZE = 32
TINY_MAX_SEQUENCE_LENGTH = 32
REAL_SIZE = 1024  # QwenImagePipeline: default_sample_size 128 x VAE scale 8
REAL_MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline's default
REAL_TRUE_CFG_SCALE = 4.0


def template_prefix_tokens(pipe: Any) -> int:
    """Tokens of the prompt template before the user's turn content (`{}`, or the input image's vision tokens of
    an editing template) under the pipeline's own tokenizer: the system prefix that `_get_qwen_prompt_embeds`
    drops. The pipelines hard-code it for the real Qwen tokenizer (34 for Qwen-Image, 64 for the editing ones)."""
    prefix = pipe.prompt_template_encode.split("{}")[0].split("<|vision_start|>")[0]
    return len(pipe.tokenizer(prefix).input_ids)


class QwenImagePolicy(DiffusersPolicyBase):
    """Implements `flowfactory.types.Policy` for Qwen-Image pipelines (or the tiny preset)."""

    name = "qwen-image"
    pipeline_class: ClassVar[type] = QwenImagePipeline  # what loads its saves (LoRA) and names them in the README
    lora_target_hint = ("Qwen-Image attention projections are to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, "
                        "add_v_proj, to_add_out; feed-forward: img_mlp.net.0.proj, img_mlp.net.2, "
                        "txt_mlp.net.0.proj, txt_mlp.net.2; modulation: img_mod.1, txt_mod.1")
    encode_options = ("max_sequence_length", "negative_prompt", "do_cfg")

    def __init__(
        self,
        pipe: QwenImagePipeline,
        *,
        height: int,
        width: int,
        max_sequence_length: int,
        true_cfg_scale: float,
        negative_prompt: str = " ",
        lora: LoraOptions | None = None,
        gradient_checkpointing: bool = False,
        reference: bool = True,
        device: torch.device | str | None = None,
        seed: int = 0,
        offload_text_encoders: bool = False,
        vae_decode_chunk: int | None = None,
    ):
        self.true_cfg_scale = true_cfg_scale
        self.negative_prompt = negative_prompt
        self.vae_scale_factor: int = pipe.vae_scale_factor
        super().__init__(pipe, height=height, width=width, max_sequence_length=max_sequence_length,
                         lora=lora, gradient_checkpointing=gradient_checkpointing, reference=reference, device=device,
                         seed=seed, offload_text_encoders=offload_text_encoders, vae_decode_chunk=vae_decode_chunk)

    def _validate(self, pipe: QwenImagePipeline) -> None:
        self._check_multiple(2 * self.vae_scale_factor, f"patch size 2 x the VAE scale factor {self.vae_scale_factor}")
        # the pipeline's hard-coded 34 assumes Qwen's tokenizer; count the prefix with the one loaded
        pipe.prompt_template_encode_start_idx = template_prefix_tokens(pipe)
        h, w = self.height // self.vae_scale_factor, self.width // self.vae_scale_factor
        self.latent_hw: tuple[int, int] = (h, w)
        self.latent_channels: int = pipe.vae.config.z_dim
        self.latent_shape: tuple[int, ...] = ((h // 2) * (w // 2), self.latent_channels * 4)

    def _dead_modules(self, transformer: torch.nn.Module) -> list[str]:
        """The last block's text-stream output path (text queries and their norm, attention out projection, text
        MLP): the transformer discards the text stream after it, so these never get a gradient."""
        block = f"transformer_blocks.{len(transformer.transformer_blocks) - 1}"
        names = {n for n, _ in transformer.named_modules()}
        return [f"{block}.{m}" for m in ("attn.add_q_proj", "attn.norm_added_q", "attn.to_add_out", "txt_mlp")
                if f"{block}.{m}" in names]

    @property
    def do_cfg(self) -> bool:
        """True when true_cfg_scale > 1: velocity mixes a conditional and an unconditional pass."""
        return self.true_cfg_scale > 1.0

    # -- Policy protocol -------------------------------------------------------------------------------------

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`QwenImagePipeline.encode_prompt`, zero-padded to max_sequence_length with a 0/1 mask [B, L]."""
        embeds, mask = self.pipe.encode_prompt(prompt=list(prompts), device=self.device,
                                               max_sequence_length=self.max_sequence_length)
        b, n, d = embeds.shape
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.long, device=embeds.device)
        pad = self.max_sequence_length - n
        embeds = torch.cat([embeds, embeds.new_zeros(b, pad, d)], dim=1)
        mask = torch.cat([mask.long(), mask.new_zeros(b, pad, dtype=torch.long)], dim=1)
        return embeds, mask

    @torch.no_grad()
    def encode(self, prompts: list[Prompt]) -> Conditioning:
        """Qwen2.5-VL last hidden states of the templated prompt, system prefix dropped, [B, L, D] with its
        mask [B, L]; with true CFG also the negative prompt's, one row per prompt."""
        with self.text_encoders():
            embeds, mask = self._encode(texts(prompts))
            cond = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
            if self.do_cfg:
                neg, neg_mask = self._encode([self.negative_prompt] * len(prompts))
                cond |= {"negative_prompt_embeds": neg, "negative_prompt_embeds_mask": neg_mask}
        return cond

    def noise(self, generators: list[torch.Generator]) -> torch.Tensor:
        """Gaussian packed latents [B, tokens, 4C]; row i drawn from generators[i] as the pipeline's
        prepare_latents ([1, C, h, w] per sample, then 2x2 packing)."""
        h, w = self.latent_hw
        z = randn_per_sample((1, self.latent_channels, h, w), generators, device=self.device, dtype=torch.float32)
        z = self.pipe._pack_latents(z, len(generators), self.latent_channels, h, w)
        return z.to(self.compute_dtype)

    def sigmas(self, steps: int) -> torch.Tensor:
        """The pipeline's schedule: linspace(1, 1/steps) through the scheduler with mu from the image token
        count (dynamic shift), then 0; float32 CPU. One step is [1, 0]: the scheduler's stretch to
        shift_terminal divides by zero there (the pipeline itself gives NaN)."""
        def compute() -> torch.Tensor:
            if steps == 1:
                return torch.tensor([1.0, 0.0])
            sched = self._scheduler
            retrieve_timesteps(sched, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps),
                               mu=self._dynamic_shift_mu(self.latent_shape[0]))
            return sched.sigmas

        return self._cached_sigmas(steps, compute)

    def _image_stream(self, x: torch.Tensor, cond: Conditioning) -> tuple[torch.Tensor, list[list[tuple[int, ...]]]]:
        """The transformer's image-stream input for latents x and each row's token grids (frame, rows, columns):
        the packed latents alone here; an editing policy appends its input images' latents."""
        h, w = self.latent_hw
        return x, [[(1, h // 2, w // 2)]] * x.shape[0]

    def _transformer(self, hidden: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
                     mask: torch.Tensor, img_shapes: list[list[tuple[int, ...]]]) -> torch.Tensor:
        return self._network()(hidden_states=hidden, timestep=timestep, guidance=None,
                               encoder_hidden_states_mask=mask, encoder_hidden_states=embeds,
                               img_shapes=img_shapes, return_dict=False)[0]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Transformer velocity (noise - data) for packed latents at noise level sigma; with true CFG the
        pipeline's norm-rescaled mix of the conditional and unconditional passes."""
        sigma = self._row_sigmas(x, sigma, f"packed latents of {self.height}x{self.width} images")
        dtype, device = self.compute_dtype, x.device
        # the pipeline feeds scheduler.timesteps (sigma * 1000, float32) cast to the latents' dtype, over 1000
        t = sigma * self._scheduler.config.num_train_timesteps
        timestep = t.to(dtype) / 1000
        hidden, img_shapes = self._image_stream(x.to(dtype), cond)
        n = x.shape[1]  # the output tokens; the rest of the image stream (an edit's input images) is dropped
        out = self._transformer(hidden, timestep, cond["prompt_embeds"].to(device=device, dtype=dtype),
                                cond["prompt_embeds_mask"].to(device), img_shapes)[:, :n]
        if self.do_cfg:
            if "negative_prompt_embeds" not in cond:
                raise KeyError(f"{self.name} velocity: true_cfg_scale > 1 needs the negative prompt embeddings that "
                               "encode() returns; re-encode the prompts with this policy")
            neg = self._transformer(hidden, timestep, cond["negative_prompt_embeds"].to(device=device, dtype=dtype),
                                    cond["negative_prompt_embeds_mask"].to(device), img_shapes)[:, :n]
            mixed = neg + self.true_cfg_scale * (out - neg)
            out = mixed * (torch.norm(out, dim=-1, keepdim=True) / torch.norm(mixed, dim=-1, keepdim=True))
        return out.to(x.dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Packed latents to images [B, 3, H, W] in [0, 1], float32 (unpack, un-normalise, VAE decode)."""
        vae = self.vae
        latents = self.pipe._unpack_latents(x.to(self.device), self.height, self.width, self.vae_scale_factor)
        latents = latents.to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        return self._vae_decode(latents / inv_std + mean, lambda video: (video[:, :, 0].float() / 2 + 0.5).clamp(0, 1))

    def _saved_settings(self) -> dict[str, Any]:
        """What `save` records in flowfactory.json beside the weights: the settings the samples were made with."""
        return {"height": self.height, "width": self.width, "max_sequence_length": self.max_sequence_length,
                "true_cfg_scale": self.true_cfg_scale, "negative_prompt": self.negative_prompt}

    def _call_example(self) -> tuple[str, str]:
        """The inputs and keyword arguments of the saved README's `pipe(...)` call."""
        cfg = f"negative_prompt={self.negative_prompt!r}, true_cfg_scale={self.true_cfg_scale}, " if self.do_cfg else ""
        return "prompt", f"{cfg}height={self.height}, width={self.width}, max_sequence_length={self.max_sequence_length}"

    def save(self, directory: str) -> None:
        """LoRA: diffusers LoRA file (`pipe.load_lora_weights(dir)`); full: `dir/transformer` model folder."""
        inputs, call_args = self._call_example()
        self._save_with_notes(directory, self.pipeline_class, QwenImageTransformer2DModel, self.name,
                              self._saved_settings(), call_args, inputs=inputs)


def build_policy(options: QwenImageOptions, ctx: BuildContext) -> QwenImagePolicy:
    """Load or build the pipeline and wrap it as a `QwenImagePolicy`.

    Frozen parts get the resolved dtype; a full finetune's transformer is float32 (master weights, mixed
    precision is Accelerate's), a LoRA's base transformer the frozen dtype.
    """
    from flowfactory_qwen_image.tiny import build_tiny_pipeline

    pipe, tiny = load_or_build(options, ctx, QwenImagePipeline, lambda: build_tiny_pipeline(ctx.seed),
                               policy="qwen-image", example="Qwen/Qwen-Image")
    if tiny:
        size, max_len, cfg = TINY_SIZE, TINY_MAX_SEQUENCE_LENGTH, 1.0
    else:
        size = pipe.default_sample_size * pipe.vae_scale_factor
        max_len, cfg = REAL_MAX_SEQUENCE_LENGTH, REAL_TRUE_CFG_SCALE
    height = options.height or size
    return QwenImagePolicy(
        pipe, height=height, width=options.width or options.height or size,
        max_sequence_length=options.max_sequence_length or max_len,
        true_cfg_scale=options.true_cfg_scale if options.true_cfg_scale is not None else cfg,
        negative_prompt=options.negative_prompt, **training_kwargs(options, ctx))
