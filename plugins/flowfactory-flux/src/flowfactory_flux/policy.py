"""`FluxPolicy`: a diffusers FluxPipeline seen through flowfactory's `Policy` protocol.

Everything model-specific lives here: 2x2 latent packing, the rotary position ids, distilled guidance,
the resolution-dependent sigma shift, VAE scaling. The math follows `FluxPipeline.__call__` step for step,
so an ODE rollout of this policy reproduces the pipeline's image from the same latents.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from torch import nn

from flowfactory.errors import FlowFactoryError
from flowfactory.registry import BuildContext
from flowfactory.samplers.flow import randn_per_sample
from flowfactory.types import Conditioning
from flowfactory_flux import FluxOptions, LoraOptions

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_SIZE = 32
TINY_MAX_SEQUENCE_LENGTH = 32
REAL_SIZE = 512
REAL_MAX_SEQUENCE_LENGTH = 512
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class FluxPolicy:
    """Implements `flowfactory.types.Policy` for FLUX.1 pipelines (dev, schnell, or the tiny preset).

    `module` is the trainable transformer and may be replaced by the training loop with its Accelerate
    wrapper; `transformer` stays the raw diffusers model (config, adapters, saving).
    """

    def __init__(
        self,
        pipe: FluxPipeline,
        *,
        height: int,
        width: int,
        max_sequence_length: int,
        guidance_scale: float,
        lora: LoraOptions | None,
        gradient_checkpointing: bool = False,
        device: torch.device | str | None = None,
        seed: int = 0,
    ):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.height, self.width = height, width
        self.max_sequence_length = max_sequence_length
        self.guidance_scale = guidance_scale
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)
        self.lora = lora
        self.vae_scale_factor: int = pipe.vae_scale_factor
        factor = 2 * self.vae_scale_factor
        if height % factor or width % factor:
            raise FlowFactoryError(
                f"flux policy options height={height}, width={width}: both must be multiples of {factor} "
                f"(2 x the VAE scale factor {self.vae_scale_factor}, for the 2x2 latent packing); "
                f"try height: {max(factor, height // factor * factor)}, width: {max(factor, width // factor * factor)}")
        channels = self.transformer.config.in_channels // 4
        self._unpacked_shape = (channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        c, h, w = self._unpacked_shape
        self.latent_shape: tuple[int, ...] = ((h // 2) * (w // 2), c * 4)
        self.compute_dtype: torch.dtype = self.transformer.dtype  # base weights; LoRA params are kept in float32

        for frozen in (pipe.text_encoder, pipe.text_encoder_2, self.vae):
            frozen.requires_grad_(False).eval()
        self.fsdp_block_classes: tuple[type, ...] = _block_classes(self.transformer)

        self._frozen_copy: nn.Module | None = None
        if lora is not None:
            self._add_lora(lora, seed)
        else:
            self.transformer.requires_grad_(True)
            # the pre-training policy for `reference()`; made before any Accelerate/FSDP wrapping
            self._frozen_copy = copy.deepcopy(self.transformer).requires_grad_(False).eval()
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.transformer.train()  # only LoRA dropout depends on it; FLUX has no other train-time behaviour
        self.module: Any = self.transformer
        self._in_reference = False

        self._scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # private: set_timesteps mutates
        self._sigmas: dict[int, torch.Tensor] = {}
        self._ids: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.to(self.device)

    # -- setup -----------------------------------------------------------------------------------------------

    def _add_lora(self, lora: LoraOptions, seed: int) -> None:
        """Inject a peft LoRA adapter (A drawn from `seed`, B zero), trainable in float32; freeze the rest."""
        from peft import LoraConfig

        self.transformer.requires_grad_(False)
        names = [name for name, _ in self.transformer.named_modules()]
        missing = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise FlowFactoryError(
                f"flux policy option lora.target_modules: {missing} match no module of the transformer; "
                f"FLUX attention projections are to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, "
                f"to_add_out (feed-forward: ff.net.0.proj, ff.net.2, proj_mlp, proj_out)")
        config = LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
            target_modules=list(lora.target_modules), lora_dropout=lora.dropout,
            init_lora_weights=True if lora.init == "default" else "gaussian",
        )
        with torch.random.fork_rng(devices=[]):  # A's init draws from the global RNG: make it the run's seed
            torch.manual_seed(seed)
            self.transformer.add_adapter(config)
        for name, p in self.transformer.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()  # adapters train in float32 whatever the base dtype
                p.requires_grad_(True)

    def to(self, device: torch.device | str) -> FluxPolicy:
        """Move every part (and the reference copy) to `device`."""
        self.device = torch.device(device)
        self.pipe.to(self.device)
        if self._frozen_copy is not None:
            self._frozen_copy.to(self.device)
        self._ids.clear()
        return self

    # -- Policy protocol -------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """T5 sequence embeddings [B, T, D] and CLIP pooled embeddings [B, P], as FluxPipeline.encode_prompt."""
        prompt_embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def noise(self, generators: list[torch.Generator]) -> torch.Tensor:
        """Packed Gaussian latents [B, seq, 4C]; row i is drawn unpacked ([C, h, w]) from generators[i]."""
        c, h, w = self._unpacked_shape
        z = randn_per_sample((c, h, w), generators, device=self.device, dtype=torch.float32)
        return FluxPipeline._pack_latents(z, z.shape[0], c, h, w).to(self.compute_dtype)

    def sigmas(self, steps: int) -> torch.Tensor:
        """FluxPipeline's schedule: linspace(1, 1/steps) shifted by mu(image tokens), then 0; float32 CPU."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if steps not in self._sigmas:
            sched = self._scheduler
            base = None if sched.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
            mu = calculate_shift(
                self.latent_shape[0], sched.config.get("base_image_seq_len", 256),
                sched.config.get("max_image_seq_len", 4096), sched.config.get("base_shift", 0.5),
                sched.config.get("max_shift", 1.15))
            retrieve_timesteps(sched, steps, "cpu", sigmas=base, mu=mu)
            self._sigmas[steps] = sched.sigmas.detach().to(torch.float32).cpu()
        return self._sigmas[steps].clone()

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Transformer velocity (noise - data) for packed latents x at noise level sigma, in x's dtype."""
        if tuple(x.shape[1:]) != self.latent_shape:
            raise ValueError(f"flux velocity: x has per-sample shape {tuple(x.shape[1:])}, expected "
                             f"{self.latent_shape} (packed latents of {self.height}x{self.width} images)")
        b, dtype, device = x.shape[0], self.compute_dtype, x.device
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
        timestep = (sigma.expand(b) if sigma.ndim == 0 else sigma).to(dtype)
        prompt_embeds = cond["prompt_embeds"].to(device=device, dtype=dtype)
        pooled = cond["pooled_prompt_embeds"].to(device=device, dtype=dtype)
        img_ids, txt_ids = self._position_ids(prompt_embeds.shape[1], device, dtype)
        guidance = (torch.full((b,), self.guidance_scale, device=device, dtype=torch.float32)
                    if self.guidance_embeds else None)
        net = self._frozen_copy if (self._in_reference and self._frozen_copy is not None) else self.module
        out = net(hidden_states=x.to(dtype), timestep=timestep, guidance=guidance, pooled_projections=pooled,
                  encoder_hidden_states=prompt_embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return out.to(x.dtype)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Packed latents to images [B, 3, H, W] in [0, 1], float32 (unpack, unscale, VAE decode)."""
        latents = FluxPipeline._unpack_latents(x, self.height, self.width, self.vae_scale_factor)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(latents.to(device=self.device, dtype=self.vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA weights (float32), or every transformer parameter for a full finetune.

        Looked up on each call, not cached: FSDP replaces parameters when it shards the module, and
        `reference()` switches the adapters' requires_grad off while it runs."""
        if self.lora is None:
            return list(self.transformer.parameters())
        return [p for name, p in self.transformer.named_parameters() if "lora_" in name]

    @contextmanager
    def reference(self) -> Iterator[None]:
        """The pre-training policy under no grad: adapters disabled (LoRA) or the frozen copy (full)."""
        if self._in_reference:
            raise RuntimeError("FluxPolicy.reference() is not re-entrant")
        self._in_reference = True
        lora_off = self.lora is not None
        try:
            with torch.no_grad():
                if lora_off:
                    self.transformer.disable_adapters()
                yield
        finally:
            if lora_off:
                self.transformer.enable_adapters()
            self._in_reference = False

    def save(self, directory: str) -> None:
        """LoRA: diffusers LoRA file (`pipe.load_lora_weights(dir)`); full: `dir/transformer` model folder."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if self.lora is not None:
            from peft.utils import get_peft_model_state_dict

            state = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(self.transformer).items()}
            FluxPipeline.save_lora_weights(
                out, transformer_lora_layers=state,
                transformer_lora_adapter_metadata=self.transformer.peft_config["default"].to_dict())
            load = ("pipe = FluxPipeline.from_pretrained(BASE, dtype=torch.bfloat16)\n"
                    f"pipe.load_lora_weights({str(out)!r})")
            kind = "lora"
        else:
            self.transformer.save_pretrained(out / "transformer")
            load = ("transformer = FluxTransformer2DModel.from_pretrained("
                    f"{str(out / 'transformer')!r}, dtype=torch.bfloat16)\n"
                    "pipe = FluxPipeline.from_pretrained(BASE, transformer=transformer, dtype=torch.bfloat16)")
            kind = "full"
        info = {"policy": "flux", "kind": kind, "height": self.height, "width": self.width,
                "max_sequence_length": self.max_sequence_length, "guidance_scale": self.guidance_scale,
                "base": self.pipe.config.get("_name_or_path") or None}
        (out / "flowfactory.json").write_text(json.dumps(info, indent=2) + "\n")
        (out / "README.md").write_text(
            f"# flowfactory flux policy ({kind})\n\nTrained with flowfactory. Load with diffusers, BASE being the "
            f"base FluxPipeline (hub id or folder):\n\n```python\nimport torch\n"
            f"from diffusers import FluxPipeline, FluxTransformer2DModel\n{load}\n"
            f"image = pipe(prompt, height={self.height}, width={self.width}, "
            f"max_sequence_length={self.max_sequence_length}, guidance_scale={self.guidance_scale}).images[0]\n"
            f"```\n")

    # -- helpers ---------------------------------------------------------------------------------------------

    def _position_ids(self, txt_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(img_ids [seq, 3], txt_ids [T, 3]) as FluxPipeline builds them, cached per shape/device/dtype."""
        key = (txt_len, str(device), dtype)
        if key not in self._ids:
            _, h, w = self._unpacked_shape
            img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)
            txt_ids = torch.zeros(txt_len, 3, device=device, dtype=dtype)
            self._ids[key] = (img_ids, txt_ids)
        return self._ids[key]


def _block_classes(transformer: nn.Module) -> tuple[type, ...]:
    """The classes named by diffusers' `_no_split_modules`, found in the module tree."""
    names = list(getattr(transformer, "_no_split_modules", None) or [])
    found: dict[str, type] = {}
    for m in transformer.modules():
        if type(m).__name__ in names:
            found.setdefault(type(m).__name__, type(m))
    if not found:
        raise FlowFactoryError(f"{type(transformer).__name__} declares no block classes in _no_split_modules "
                               f"({names}); FSDP would not know what to wrap")
    return tuple(found[n] for n in names if n in found)


def _resolve_dtype(options: FluxOptions, ctx: BuildContext) -> torch.dtype:
    if options.dtype is not None:
        return DTYPES[options.dtype]
    if ctx.dtype is not None:
        return DTYPES[ctx.dtype] if isinstance(ctx.dtype, str) else ctx.dtype
    return torch.float32 if options.preset == "tiny" else torch.bfloat16


def _dtype_keyword() -> str:
    """diffusers renamed from_pretrained's `torch_dtype` to `dtype`; use the name the installed one takes."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _load_pipeline(model: str, revision: str | None, dtype: dict[str, torch.dtype]) -> FluxPipeline:
    """`FluxPipeline.from_pretrained` with errors that name the `model` option and the fix."""
    path = Path(os.path.expanduser(model))
    is_local = path.exists() or not HUB_ID.match(model)
    if is_local:
        if not path.is_dir():
            raise FlowFactoryError(
                f"flux policy option model={model!r}: no such folder. Give a folder written by "
                f"FluxPipeline.save_pretrained (it holds model_index.json) or a hub id such as "
                f"black-forest-labs/FLUX.1-dev.")
        if not (path / "model_index.json").is_file():
            raise FlowFactoryError(
                f"flux policy option model={model!r}: the folder has no model_index.json, so it is not a diffusers "
                f"pipeline; point it at the folder FluxPipeline.save_pretrained wrote.")
    try:
        return FluxPipeline.from_pretrained(str(path) if is_local else model, revision=revision,
                                            **{_dtype_keyword(): dtype})
    except OSError as exc:
        raise FlowFactoryError(
            f"flux policy option model={model!r}{f' (revision {revision!r})' if revision else ''} could not be "
            f"loaded: {exc}. Check the id, your network and Hugging Face login (FLUX.1-dev is gated), or give a "
            f"local folder.") from exc


def build_policy(options: FluxOptions, ctx: BuildContext) -> FluxPolicy:
    """Load or build the pipeline and wrap it as a `FluxPolicy`.

    Frozen parts get the resolved dtype; a full finetune's transformer is float32 (master weights, mixed
    precision is Accelerate's), a LoRA's base transformer the frozen dtype.
    """
    dtype = _resolve_dtype(options, ctx)
    transformer_dtype = dtype if options.lora is not None else torch.float32
    if options.preset == "tiny":
        from flowfactory_flux.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(ctx.seed)  # float32
        for part, want in ((pipe.text_encoder, dtype), (pipe.text_encoder_2, dtype), (pipe.vae, dtype),
                           (pipe.transformer, transformer_dtype)):
            if part.dtype != want:  # nn.Module.to: diffusers' own .to warns about fp32 modules these have none of
                nn.Module.to(part, want)
        size, max_len = TINY_SIZE, TINY_MAX_SEQUENCE_LENGTH
    else:
        assert options.model is not None  # the options validator guarantees one of model/preset
        pipe = _load_pipeline(options.model, options.revision, {"transformer": transformer_dtype, "default": dtype})
        size, max_len = REAL_SIZE, REAL_MAX_SEQUENCE_LENGTH
    return FluxPolicy(
        pipe, height=options.height or size, width=options.width or size,
        max_sequence_length=options.max_sequence_length or max_len, guidance_scale=options.guidance_scale,
        lora=options.lora, gradient_checkpointing=options.gradient_checkpointing, device=ctx.device,
        seed=ctx.seed,
    )
