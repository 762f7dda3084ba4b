"""`QwenImage21Policy`: Qwen-Image 2.1 (diffusers `QwenImage21Pipeline`) text-to-image as a flowfactory `Policy`.

Qwen-Image 2.1 is not Qwen-Image with new weights: a Qwen3-VL encoder (its last layer read before the final norm,
system message dropped), a single-stream transformer whose joint sequence is the prompt's tokens followed by the
target image's (block-causal attention: text causal, each image block bidirectional; text modulated at t = 0),
unpatched 16x-compressed latents, and an RGBA VAE. The math follows `QwenImage21Pipeline.__call__` with
`use_kv_cache=False`, so an ODE rollout reproduces the pipeline's image from the same latents; with the pipeline's
default key/value cache the two differ by rounding only.

The transformer places the target image's RoPE frame after every text slot before it, padding included, so a
prompt's velocity depends on how far it was padded: the pipeline pads a batch to its longest prompt, which makes a
prompt's image depend on its batch. The policy runs each row at its own length (rows of one length in one call):
every row is what the pipeline makes of that prompt alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import QwenImage21Pipeline, QwenImage21Transformer2DModel
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import retrieve_timesteps

from flowfactory.errors import FlowFactoryError
from flowfactory.prompts import Prompt, texts
from flowfactory.registry import BuildContext
from flowfactory.seeding import randn_per_sample
from flowfactory.types import Conditioning
from flowfactory_diffusers.policy import DiffusersPolicyBase, load_or_build, training_kwargs
from flowfactory_qwen_image.edit import load_processor

TINY_SIZE = 64  # 4x4 latent tokens at the pipeline's 16x compression
TINY_MAX_SEQUENCE_LENGTH = 64
REAL_SIZE = 1024  # QwenImage21Pipeline's output_resolution
REAL_MAX_SEQUENCE_LENGTH = 1024
SLOT = 4  # latent tokens per image slot of the joint sequence (2x2)


def load_qwen21_processor(folder: Path) -> Any:
    """The pipeline's `Qwen3VLProcessor` from its folder, without its video half (see `edit.load_processor`)."""
    from transformers import Qwen3VLProcessor

    return load_processor(folder, Qwen3VLProcessor)


class QwenImage21Policy(DiffusersPolicyBase):
    """Implements `flowfactory.types.Policy` for Qwen-Image 2.1 text-to-image (or the tiny preset)."""

    name = "qwen-image-2.1"
    lora_target_hint = ("Qwen-Image 2.1 attention projections are to_q, to_k, to_v, to_out.0; feed-forward: "
                        "img_mlp.proj, img_mlp.gate_layer, img_mlp.out; the shared modulation: modulation.1")
    encode_options = ("max_sequence_length", "negative_prompt", "do_cfg")

    def __init__(
        self,
        pipe: QwenImage21Pipeline,
        *,
        height: int,
        width: int,
        max_sequence_length: int,
        true_cfg_scale: float,
        negative_prompt: str = " ",
        lora: Any = None,
        gradient_checkpointing: bool = False,
        reference: bool = True,
        device: torch.device | str | None = None,
        seed: int = 0,
        offload_text_encoders: bool = False,
        vae_decode_chunk: int | None = None,
    ):
        self.true_cfg_scale = true_cfg_scale
        self.negative_prompt = negative_prompt
        self.vae_scale_factor: int = pipe.vae_scale_factor  # the pipeline's fixed 16
        super().__init__(pipe, height=height, width=width, max_sequence_length=max_sequence_length, lora=lora,
                         gradient_checkpointing=gradient_checkpointing, reference=reference, device=device, seed=seed,
                         offload_text_encoders=offload_text_encoders, vae_decode_chunk=vae_decode_chunk)

    def _validate(self, pipe: QwenImage21Pipeline) -> None:
        self._check_multiple(2 * self.vae_scale_factor,
                             f"2 x the VAE scale factor {self.vae_scale_factor}: image slots are 2x2 latent tokens")
        h, w = self.height // self.vae_scale_factor, self.width // self.vae_scale_factor
        self.latent_hw: tuple[int, int] = (h, w)
        self.latent_channels: int = pipe.transformer.config.in_channels
        self.latent_shape: tuple[int, ...] = (h * w, self.latent_channels)

    @property
    def do_cfg(self) -> bool:
        """True when true_cfg_scale > 1: velocity mixes a conditional and a negative-prompt pass."""
        return self.true_cfg_scale > 1.0

    # -- Policy protocol -------------------------------------------------------------------------------------

    def _encode_one(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode_prompt` of one prompt (no padding, so nothing depends on other prompts), zero-padded to
        max_sequence_length with a 0/1 mask [1, L]; the pipeline cuts nothing, so a longer prompt is an error."""
        embeds, _, _ = self.pipe.encode_prompt(prompt=[text], device=self.device)
        n, d = embeds.shape[1], embeds.shape[2]
        if n > self.max_sequence_length:
            raise FlowFactoryError(
                f"{self.name} policy option max_sequence_length={self.max_sequence_length}: prompt {text!r} is {n} "
                f"tokens after the system message; raise max_sequence_length to at least {n}.")
        pad = self.max_sequence_length - n
        mask = torch.cat([torch.ones(1, n, dtype=torch.long), torch.zeros(1, pad, dtype=torch.long)], dim=1)
        return torch.cat([embeds, embeds.new_zeros(1, pad, d)], dim=1), mask.to(embeds.device)

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._encode_one(t) for t in prompts]
        return torch.cat([e for e, _ in rows]), torch.cat([m for _, m in rows])

    @torch.no_grad()
    def encode(self, prompts: list[Prompt]) -> Conditioning:
        """Per prompt, as the pipeline encodes it alone: Qwen3-VL's last-layer hidden states (before the final
        norm) of the templated prompt, system message dropped, [B, L, D] zero-padded with their mask [B, L]; with
        true CFG the negative prompt's too."""
        records = list(prompts)
        if any(isinstance(r, Prompt) and r.images for r in records):
            bad = next(r for r in records if isinstance(r, Prompt) and r.images)
            raise FlowFactoryError(
                f"{self.name} policy: prompt {bad.text!r} has input images, and this policy is Qwen-Image 2.1's "
                f"text-to-image; give text-only prompts (image-conditioned 2.1 is not supported yet).")
        with self.text_encoders():
            embeds, mask = self._encode(texts(records))
            cond = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
            if self.do_cfg:
                neg, neg_mask = self._encode([self.negative_prompt] * len(records))
                cond |= {"negative_prompt_embeds": neg, "negative_prompt_embeds_mask": neg_mask}
        return cond

    def noise(self, generators: list[torch.Generator]) -> torch.Tensor:
        """Gaussian latents [B, h*w, C]; row i drawn from generators[i] as the pipeline's prepare_latents ([1, C, h,
        w] per sample, then flattened: 2.1 reads its latents unpatched)."""
        h, w = self.latent_hw
        z = randn_per_sample((1, self.latent_channels, h, w), generators, device=self.device, dtype=torch.float32)
        z = self.pipe._pack_latents(z, len(generators), self.latent_channels, h, w)
        return z.to(self.compute_dtype)

    def sigmas(self, steps: int) -> torch.Tensor:
        """The pipeline's schedule: its configured `sample_sigmas` (then `steps` must be their count) or
        linspace(1, 1/steps), through the scheduler with mu from the image token count, then 0; float32 CPU."""
        sample = self.pipe.config.get("sample_sigmas")
        if sample is not None and steps != len(sample):
            raise FlowFactoryError(
                f"{self.name} policy: this model's pipeline samples with its own {len(sample)} sigmas "
                f"(model_index.json's sample_sigmas); set the sampler's steps to {len(sample)}.")

        def compute() -> torch.Tensor:
            grid = list(sample) if sample is not None else np.linspace(1.0, 1 / steps, steps)
            retrieve_timesteps(self._scheduler, steps, "cpu", sigmas=grid,
                               mu=self._dynamic_shift_mu(self.latent_shape[0]))
            out = self._scheduler.sigmas
            if not bool(torch.isfinite(out).all()):  # a stretch to shift_terminal divides by zero at one step
                raise FlowFactoryError(f"{self.name} policy: the scheduler gives no finite schedule for {steps} "
                                       f"step(s); use more steps")
            return out

        return self._cached_sigmas(steps, compute)

    def _run(self, hidden: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
        """The transformer on rows grouped by prompt length, each group at its own length (no padding, as the
        pipeline runs one prompt): the joint sequence is the prompt's tokens, then the target image's slots."""
        h, w = self.latent_hw
        tokens = h * w
        lengths = mask.sum(dim=1).tolist()
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(int(n), []).append(i)
        out = torch.empty_like(hidden) if len(groups) > 1 else None
        for n, rows in groups.items():
            idx = torch.tensor(rows, device=hidden.device)
            b = len(rows)
            slots = torch.cat([torch.zeros(b, n, dtype=torch.bool), torch.ones(b, tokens // SLOT, dtype=torch.bool)],
                              dim=1).to(hidden.device)
            v = self._network()(hidden_states=hidden[idx] if out is not None else hidden, timestep=timestep[idx],
                                encoder_hidden_states=embeds[idx, :n], img_shapes=[[(1, h, w)]] * b, img_mask=slots,
                                encoder_hidden_states_mask=None, return_dict=False)[0][:, -tokens:]
            if out is None:
                return v
            out = out.index_copy(0, idx, v.to(out.dtype))
        assert out is not None
        return out

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Transformer velocity for latents at noise level sigma (each prompt at its own length); with true CFG
        the pipeline's mix neg + s (cond - neg)."""
        sigma = self._row_sigmas(x, sigma, f"latents of {self.height}x{self.width} images")
        dtype, device = self.compute_dtype, x.device
        t = sigma * self._scheduler.config.num_train_timesteps  # scheduler.timesteps, then the latents' dtype / 1000
        timestep = t.to(dtype) / 1000
        hidden = x.to(dtype)
        out = self._run(hidden, timestep, cond["prompt_embeds"].to(device=device, dtype=dtype),
                        cond["prompt_embeds_mask"].to(device))
        if self.do_cfg:
            if "negative_prompt_embeds" not in cond:
                raise KeyError(f"{self.name} velocity: true_cfg_scale > 1 needs the negative prompt embeddings that "
                               "encode() returns; re-encode the prompts with this policy")
            neg = self._run(hidden, timestep, cond["negative_prompt_embeds"].to(device=device, dtype=dtype),
                            cond["negative_prompt_embeds_mask"].to(device))
            out = neg + self.true_cfg_scale * (out - neg)
        return out.to(x.dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents to images [B, 3, H, W] in [0, 1], float32: un-normalise, VAE decode (RGBA), the RGB channels.
        (The pipeline's images carry the alpha channel too; rewards read RGB.)"""
        vae = self.vae
        latents = self.pipe._unpack_latents(x.to(self.device), self.height, self.width, self.vae_scale_factor)
        latents = latents.to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        return self._vae_decode(latents * std + mean,
                                lambda video: (video[:, :3, 0].float() / 2 + 0.5).clamp(0, 1))

    def save(self, directory: str) -> None:
        """LoRA: diffusers LoRA file (`pipe.load_lora_weights(dir)`); full: `dir/transformer` model folder."""
        cfg = f"negative_prompt={self.negative_prompt!r}, true_cfg_scale={self.true_cfg_scale}, " if self.do_cfg else ""
        self._save_with_notes(
            directory, QwenImage21Pipeline, QwenImage21Transformer2DModel, self.name,
            {"height": self.height, "width": self.width, "max_sequence_length": self.max_sequence_length,
             "true_cfg_scale": self.true_cfg_scale, "negative_prompt": self.negative_prompt},
            f"{cfg}height={self.height}, width={self.width}")


def build_policy(options: Any, ctx: BuildContext) -> QwenImage21Policy:
    """Load or build the pipeline and wrap it (dtypes as the other diffusers policies). The processor is loaded
    without its video half (`load_qwen21_processor`)."""
    from flowfactory_qwen_image.tiny import build_tiny_qwen21_pipeline

    pipe, tiny = load_or_build(options, ctx, QwenImage21Pipeline, lambda: build_tiny_qwen21_pipeline(ctx.seed),
                               policy=QwenImage21Policy.name, example="Qwen/Qwen-Image-2.1",
                               components={"processor": load_qwen21_processor})
    size, max_len = (TINY_SIZE, TINY_MAX_SEQUENCE_LENGTH) if tiny else (REAL_SIZE, REAL_MAX_SEQUENCE_LENGTH)
    height = options.height or size
    return QwenImage21Policy(
        pipe, height=height, width=options.width or options.height or size,
        max_sequence_length=options.max_sequence_length or max_len, true_cfg_scale=options.true_cfg_scale,
        negative_prompt=options.negative_prompt, **training_kwargs(options, ctx))
