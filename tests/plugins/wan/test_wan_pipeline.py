"""Parity with diffusers for Wan 2.2's two experts (one expert, with and without CFG, is in test_wan_diffusers.py),
Wan's defaults for a `model:` folder, and its size and shift options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import WanPipeline

from flowfactory.samplers.flow import ODESampler

PROMPTS = ["a red square", "a blue circle"]


def rollout_videos(policy, steps: int, z: torch.Tensor, gens) -> torch.Tensor:
    cond = policy.encode(PROMPTS)
    traj = ODESampler(steps).rollout(policy, cond, z, gens(len(PROMPTS)), keep="final", deterministic=True)
    return policy.decode(traj.final)


def pipeline_videos(pipe: WanPipeline, steps: int, z: torch.Tensor, **kwargs) -> torch.Tensor:
    kwargs.setdefault("guidance_scale", 1.0)
    return pipe(PROMPTS, height=16, width=16, num_frames=5, num_inference_steps=steps, max_sequence_length=16,
                latents=z.clone(), output_type="pt", **kwargs).frames


def test_two_expert_rollout_equals_wan_pipeline(make_policy, tiny2_dir: Path, gens) -> None:
    """Wan 2.2 A14B-style: transformer above the boundary, transformer_2 below, each with its guidance scale."""
    policy = make_policy(tiny_experts=2, guidance_scale=3.0, guidance_scale_2=2.0)
    z = policy.noise(gens(2))
    ours = rollout_videos(policy, 4, z, gens)
    pipe = WanPipeline.from_pretrained(tiny2_dir)
    theirs = pipeline_videos(pipe, 4, z, guidance_scale=3.0, guidance_scale_2=2.0)
    assert (ours - theirs).abs().max() < 1e-4
    one = WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                      transformer=pipe.transformer, scheduler=pipe.scheduler)  # the first expert throughout
    assert (ours - pipeline_videos(one, 4, z, guidance_scale=3.0)).abs().max() > 1e-3


def test_model_defaults_are_wans(make_policy, tiny_dir: Path) -> None:
    policy = make_policy(model=str(tiny_dir), lora={"rank": 2}, height=32, width=48, num_frames=9)
    assert (policy.max_sequence_length, policy.guidance_scale) == (512, 5.0)
    assert policy.compute_dtype == torch.bfloat16 and policy.vae.dtype == torch.bfloat16
    assert policy.latent_shape == (4, 5, 16, 24)  # the tiny VAE: 4 channels, 2x time and space
    assert set(policy.encode(["a cat"])) == {"prompt_embeds", "negative_prompt_embeds"}
    native = make_policy(model=str(tiny_dir), lora={"rank": 2})
    assert (native.height, native.width, native.num_frames) == (480, 832, 81)


def test_bad_sizes_are_explained(make_policy) -> None:
    from flowfactory.errors import FlowFactoryError

    with pytest.raises(FlowFactoryError, match="num_frames - 1"):
        make_policy(num_frames=6)
    with pytest.raises(FlowFactoryError, match="multiples of 4"):  # VAE factor 2 x patch 2
        make_policy(height=18)


def test_shift_option_changes_the_schedule(make_policy) -> None:
    default, shifted = make_policy().sigmas(4), make_policy(shift=7.0).sigmas(4)
    assert float(shifted[1]) > float(default[1]) and float(shifted[-1]) == 0.0
