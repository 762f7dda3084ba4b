"""`WanPolicy`: a diffusers WanPipeline (Wan 2.1, or Wan 2.2 A14B's two experts) seen through `Policy`.

What is Wan's own lives here: the UMT5 encoder (`encode_prompt`), CFG with a negative prompt, the scheduler's
flow shift, latents [C, F', h, w] of the causal video VAE (normalised by its per-channel mean/std), and the
expert switch of Wan 2.2: the first (high-noise) expert acts while timestep >= boundary_ratio x 1000, the
second below; the acting expert's velocity is used and trained. `module` holds both experts (`WanExperts`).
Training over both experts (LoRA or frozen copies, trainable parameters, the reference view, saving),
dtype resolution and loading are the shared `flowfactory_diffusers.policy.DiffusersPolicyBase`'s. The image-to-video
variant (`flowfactory_wan.i2v.WanI2VPolicy`) subclasses this one through the hooks `_check_pipeline`,
`_latent_channels`, `_model_input`, `_image_embeds` and `_readme_call`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from diffusers import WanPipeline, WanTransformer3DModel
from torch import nn

from flowfactory.errors import FlowFactoryError
from flowfactory.prompts import Prompt, texts
from flowfactory.registry import BuildContext
from flowfactory.seeding import randn_per_sample
from flowfactory.types import Conditioning
from flowfactory_diffusers.policy import DiffusersPolicyBase, load_or_build, training_kwargs
from flowfactory_wan import WanLoraOptions, WanOptions


class WanExperts(nn.Module):
    """The trainable module: Wan's transformer, and Wan 2.2's second (low-noise) expert when there is one."""

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module | None = None):
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2

    def experts(self) -> list[nn.Module]:
        """The experts present, first (high-noise) expert first."""
        return [m for m in (self.transformer, self.transformer_2) if m is not None]

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                expert: int = 0, encoder_hidden_states_image: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity of expert `expert` (0: transformer, 1: transformer_2); `encoder_hidden_states_image`: the
        CLIP image states of Wan 2.1 image-to-video."""
        net = self.transformer if expert == 0 else self.transformer_2
        if net is None:
            raise ValueError(f"WanExperts: expert {expert} does not exist")
        return net(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                   encoder_hidden_states_image=encoder_hidden_states_image, return_dict=False)[0]


class WanPolicy(DiffusersPolicyBase):
    """Implements `flowfactory.types.Policy` for Wan text-to-video pipelines (or the tiny preset)."""

    name = "wan"
    lora_target_hint = ("Wan attention projections are to_q, to_k, to_v, to_out.0 (attn1: self, attn2: cross); "
                        "feed-forward: ffn.net.0.proj, ffn.net.2")
    encode_options = ("max_sequence_length", "negative_prompt", "do_cfg")
    pipeline_class: ClassVar[type] = WanPipeline

    def __init__(
        self,
        pipe: Any,
        *,
        height: int,
        width: int,
        num_frames: int,
        max_sequence_length: int,
        guidance_scale: float,
        guidance_scale_2: float | None = None,
        negative_prompt: str = "",
        shift: float | None = None,
        boundary_ratio: float | None = None,
        lora: WanLoraOptions | None = None,
        gradient_checkpointing: bool = False,
        reference: bool = True,
        device: torch.device | str | None = None,
        seed: int = 0,
        offload_text_encoders: bool = False,
        vae_decode_chunk: int | None = None,
    ):
        if pipe.transformer is None:
            raise FlowFactoryError(f"{self.name} policy: the pipeline has no `transformer`; Wan 2.2 single-stage "
                                   f"variants without the high-noise expert are not supported")
        if getattr(pipe.config, "expand_timesteps", False):
            raise FlowFactoryError(
                f"{self.name} policy: expand_timesteps pipelines (Wan 2.2 TI2V-5B) are not supported: they hold the "
                f"first latent frame to the input image's latents and give each token its own timestep, a schedule "
                f"that a velocity over the whole latent video and a decode without the conditioning cannot follow")
        scheduler_config = dict(pipe.scheduler.config)
        if shift is not None:
            key = "flow_shift" if "flow_shift" in scheduler_config else "shift"
            scheduler_config[key] = shift
        self.num_frames = num_frames
        self.guidance_scale = guidance_scale
        self.guidance_scale_2 = guidance_scale if guidance_scale_2 is None else guidance_scale_2
        self.negative_prompt = negative_prompt
        self.transformer_2: nn.Module | None = getattr(pipe, "transformer_2", None)
        self._boundary_option = boundary_ratio
        # both experts train, the second's LoRA A drawn from seed + 1; `module` is `WanExperts` (`_combine`)
        super().__init__(pipe, height=height, width=width, max_sequence_length=max_sequence_length,
                         trained=("transformer", "transformer_2") if self.transformer_2 is not None else ("transformer",),
                         scheduler=type(pipe.scheduler).from_config(scheduler_config),
                         lora=lora, gradient_checkpointing=gradient_checkpointing, reference=reference, device=device,
                         seed=seed, offload_text_encoders=offload_text_encoders, vae_decode_chunk=vae_decode_chunk)
        self._num_train_timesteps = int(self._scheduler.config.num_train_timesteps)
        self.experts = self.module

    def _validate(self, pipe: Any) -> None:
        """The pipeline's kind, the sizes against the VAE and patch factors, the expert boundary; sets
        `latent_shape` and `boundary_ratio`."""
        self._check_pipeline(pipe)
        config = pipe.transformer.config
        spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        patch = max(config.patch_size[1:])  # (1, 2, 2) in every Wan release
        self._check_multiple(spatial * patch, f"the VAE's spatial factor {spatial} x patch size {patch}")
        num_frames = self.num_frames
        if (num_frames - 1) % temporal:
            raise FlowFactoryError(
                f"{self.name} policy option num_frames={num_frames}: num_frames - 1 must be a multiple of the VAE's temporal "
                f"factor {temporal}; try num_frames: {(num_frames - 1) // temporal * temporal + 1}")
        self.latent_shape: tuple[int, ...] = (
            self._latent_channels(pipe), (num_frames - 1) // temporal + 1, self.height // spatial, self.width // spatial)
        boundary_ratio = self._boundary_option
        ratio = boundary_ratio if boundary_ratio is not None else pipe.config.get("boundary_ratio")
        if self.transformer_2 is None and boundary_ratio is not None:
            raise FlowFactoryError(f"{self.name} policy option boundary_ratio: the pipeline has a single expert "
                                   f"(Wan 2.1); remove the option")
        if self.transformer_2 is not None and ratio is None:
            raise FlowFactoryError(f"{self.name} policy: the pipeline has transformer_2 but no boundary_ratio; set "
                                   f"the `boundary_ratio` option (0.875 for Wan 2.2 A14B T2V, 0.9 for I2V)")
        self.boundary_ratio: float | None = ratio if self.transformer_2 is not None else None

    def _combine(self, networks: Mapping[str, nn.Module]) -> nn.Module:
        """The experts (or their frozen copies) as one module whose forward takes the acting expert's index."""
        return WanExperts(networks["transformer"], networks.get("transformer_2"))

    # -- what the image-to-video variant changes -------------------------------------------------------------

    def _check_pipeline(self, pipe: Any) -> None:
        """Refuse a pipeline this policy cannot run, before anything is set up: here, an image-to-video
        transformer (it reads image latents beside the noise, so its input channels exceed the VAE's)."""
        channels, z_dim = pipe.transformer.config.in_channels, pipe.vae.config.z_dim
        if channels != z_dim:
            raise FlowFactoryError(
                f"{self.name} policy: the transformer takes {channels} input channels but the VAE's latents have "
                f"{z_dim}: this is an image-to-video model (Wan I2V / FLF2V); use the wan-i2v policy")

    def _latent_channels(self, pipe: Any) -> int:
        """Channels of the latents drawn, integrated and decoded (WanPipeline: the transformer's in_channels)."""
        return int(pipe.transformer.config.in_channels)

    def _model_input(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The transformer's hidden_states for latents x (before the cast to the compute dtype): x itself."""
        return x

    def _image_embeds(self, cond: Conditioning, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """The transformer's encoder_hidden_states_image: none for text-to-video."""
        return None

    def _readme_call(self) -> str:
        """The pipeline call of a save's README."""
        return (f"video = pipe(prompt, negative_prompt={self.negative_prompt!r}, height={self.height}, "
                f"width={self.width}, num_frames={self.num_frames}, max_sequence_length={self.max_sequence_length}, "
                f"guidance_scale={self.guidance_scale}).frames[0]")

    @property
    def do_cfg(self) -> bool:
        """True when guidance_scale > 1 (as WanPipeline): velocity mixes a conditional and an unconditional pass."""
        return self.guidance_scale > 1.0

    def expert_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """[B] long: 0 where the first (high-noise) expert acts at `sigma`, 1 where the second does."""
        timestep = torch.as_tensor(sigma, dtype=torch.float32) * self._num_train_timesteps
        if self.boundary_ratio is None:
            return torch.zeros(timestep.shape, dtype=torch.long, device=timestep.device)
        return (timestep < self.boundary_ratio * self._num_train_timesteps).long()

    # -- Policy protocol -------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, prompts: list[Prompt]) -> Conditioning:
        """`WanPipeline.encode_prompt`: UMT5 states [B, L, D], zero past each prompt's tokens; with CFG also the
        negative prompt's, one row per prompt."""
        with self.text_encoders():
            embeds, neg = self.pipe.encode_prompt(
                prompt=texts(prompts), negative_prompt=self.negative_prompt, do_classifier_free_guidance=self.do_cfg,
                max_sequence_length=self.max_sequence_length, device=self.device)
        cond = {"prompt_embeds": embeds}
        if self.do_cfg:
            cond["negative_prompt_embeds"] = neg
        return cond

    def noise(self, generators: list[torch.Generator]) -> torch.Tensor:
        """Gaussian latents [B, C, F', h, w] in float32 (as WanPipeline.prepare_latents); row i from generators[i]."""
        return randn_per_sample(self.latent_shape, generators, device=self.device, dtype=torch.float32)

    def sigmas(self, steps: int) -> torch.Tensor:
        """The scheduler's own schedule (`set_timesteps` with its flow shift), ending at 0; float32 CPU."""
        def compute() -> torch.Tensor:
            self._scheduler.set_timesteps(steps, device="cpu")
            s = torch.as_tensor(self._scheduler.sigmas)
            if s.shape != (steps + 1,) or float(s[-1]) != 0.0:
                raise FlowFactoryError(
                    f"wan policy: the scheduler {type(self._scheduler).__name__} gives sigmas of shape "
                    f"{tuple(s.shape)} ending at {float(s[-1])}; a flow scheduler ending at sigma 0 is needed")
            return s

        return self._cached_sigmas(steps, compute)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Velocity (noise - data) of the expert acting at sigma, CFG-mixed with that expert's guidance scale."""
        sigma = self._row_sigmas(x, sigma, f"latents of {self.num_frames}x{self.height}x{self.width} videos")
        experts = self.expert_index(sigma)
        if bool((experts == experts[0]).all()):
            return self._expert_velocity(int(experts[0]), x, sigma, cond)
        out = torch.empty_like(x)
        for e in (0, 1):  # rows on either side of the boundary: each row gets its own acting expert
            rows = (experts == e).nonzero().flatten()
            if rows.numel():
                out[rows] = self._expert_velocity(e, x[rows], sigma[rows], {k: v[rows] for k, v in cond.items()})
        return out

    def _expert_velocity(self, expert: int, x: torch.Tensor, sigma: torch.Tensor,
                         cond: Conditioning) -> torch.Tensor:
        dtype, device = self.compute_dtype, x.device
        scale = self.guidance_scale if expert == 0 else self.guidance_scale_2
        timestep = sigma * self._num_train_timesteps  # WanPipeline feeds scheduler.timesteps = sigmas x 1000
        embeds = cond["prompt_embeds"].to(device=device, dtype=dtype)
        hidden = self._model_input(x, cond).to(dtype)
        image = self._image_embeds(cond, device, dtype)
        cfg = self.do_cfg
        if cfg:  # one batch, conditional rows first
            if "negative_prompt_embeds" not in cond:
                raise KeyError(f"{self.name} velocity: guidance_scale > 1 needs the negative prompt embeddings that "
                               f"encode() returns; re-encode the prompts with this policy")
            embeds = torch.cat([embeds, cond["negative_prompt_embeds"].to(device=device, dtype=dtype)])
            hidden, timestep = torch.cat([hidden, hidden]), torch.cat([timestep, timestep])
            image = None if image is None else torch.cat([image, image])
        out = self._network()(hidden, timestep, embeds, expert, encoder_hidden_states_image=image)
        if cfg:
            text, uncond = out.chunk(2)
            out = uncond + scale * (text - uncond)
        return out.to(x.dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents to videos [B, T, 3, H, W] in [0, 1], float32 (un-normalise, Wan VAE decode)."""
        cfg = self.vae.config
        view = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean).view(view).to(self.device, self.vae.dtype)
        std = torch.tensor(cfg.latents_std).view(view).to(self.device, self.vae.dtype)
        latents = x.to(device=self.device, dtype=self.vae.dtype) * std + mean
        # the VAE gives [B, 3, T, H, W] in [-1, 1]
        return self._vae_decode(latents, lambda video: (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
                                .contiguous())

    def save(self, directory: str) -> None:
        """LoRA: diffusers LoRA files (`pipe.load_lora_weights(dir)`, the second expert's from dir/transformer_2
        with load_into_transformer_2=True); full: `dir/transformer` (and `dir/transformer_2`) model folders."""
        two = self.transformer_2 is not None
        self._save_with_notes(
            directory, self.pipeline_class, WanTransformer3DModel, self.name,
            {"experts": 2 if two else 1, "height": self.height, "width": self.width, "num_frames": self.num_frames,
             "max_sequence_length": self.max_sequence_length, "guidance_scale": self.guidance_scale,
             "guidance_scale_2": self.guidance_scale_2 if two else None, "boundary_ratio": self.boundary_ratio,
             "negative_prompt": self.negative_prompt,
             "shift": self._scheduler.config.get("flow_shift", self._scheduler.config.get("shift"))},
            call=self._readme_call())

def build_policy(options: WanOptions, ctx: BuildContext) -> WanPolicy:
    """Load or build the pipeline and wrap it as a `WanPolicy`.

    Frozen parts get the resolved dtype; a full finetune's experts are float32 (master weights, mixed precision
    is Accelerate's), a LoRA's base experts the frozen dtype.
    """
    from flowfactory_wan.tiny import build_tiny_pipeline

    pipe, tiny = load_or_build(options, ctx, WanPipeline,
                               lambda: build_tiny_pipeline(ctx.seed, experts=options.tiny_experts), policy="wan",
                               example="Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    o = options.resolved(tiny)
    return WanPolicy(
        pipe, height=o.height, width=o.width, num_frames=o.num_frames, max_sequence_length=o.max_sequence_length,
        guidance_scale=o.guidance_scale, guidance_scale_2=o.guidance_scale_2, negative_prompt=o.negative_prompt,
        shift=o.shift, boundary_ratio=o.boundary_ratio, **training_kwargs(o, ctx))

