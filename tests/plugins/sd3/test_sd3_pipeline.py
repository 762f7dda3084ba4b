"""Parity with diffusers: an ODE rollout of the policy equals StableDiffusion3Pipeline.__call__ (with and
without CFG), and `model:` loads folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from flowfactory.samplers.flow import ODESampler

PROMPTS = ["a red square", "a blue circle"]


def rollout_images(policy, steps: int, z: torch.Tensor, gens) -> torch.Tensor:
    cond = policy.encode(PROMPTS)
    traj = ODESampler(steps).rollout(policy, cond, z, gens(len(PROMPTS)), keep="final", deterministic=True)
    return policy.decode(traj.final)


def pipeline_images(pipe: StableDiffusion3Pipeline, steps: int, z: torch.Tensor, **kwargs) -> torch.Tensor:
    kwargs.setdefault("guidance_scale", 1.0)
    return pipe(PROMPTS, height=32, width=32, num_inference_steps=steps, max_sequence_length=16,
                latents=z.clone(), output_type="pt", **kwargs).images


@pytest.mark.parametrize("steps", [1, 5])
def test_ode_rollout_equals_sd3_pipeline(make_policy, tiny_dir: Path, gens, steps: int) -> None:
    policy = make_policy()  # preset tiny, seed 0: the same weights as tiny_dir, built independently
    z = policy.noise(gens(2))
    ours = rollout_images(policy, steps, z, gens)
    theirs = pipeline_images(StableDiffusion3Pipeline.from_pretrained(tiny_dir), steps, z)
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert (ours - theirs).abs().max() < 1e-4
    assert ours.std() > 0.01  # not a constant image


def test_cfg_rollout_equals_sd3_pipeline(make_policy, tiny_dir: Path, gens) -> None:
    """guidance_scale > 1: conditional and unconditional passes with a negative prompt, as diffusers does."""
    policy = make_policy(guidance_scale=4.5, negative_prompt="a green tree")
    z = policy.noise(gens(2))
    ours = rollout_images(policy, 4, z, gens)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_dir)
    theirs = pipeline_images(pipe, 4, z, guidance_scale=4.5, negative_prompt="a green tree")
    assert (ours - theirs).abs().max() < 1e-4
    no_cfg = pipeline_images(pipe, 4, z)
    assert (ours - no_cfg).abs().max() > 1e-3  # CFG changed the image, so the check has teeth


def test_model_path_loads_a_saved_pipeline(make_policy, tiny_dir: Path, gens) -> None:
    loaded = make_policy(model=str(tiny_dir), dtype="float32", height=32, max_sequence_length=16, guidance_scale=1.0)
    preset = make_policy()
    assert loaded.width == 32  # width defaults to height
    x, sigma = preset.noise(gens(2)), torch.tensor(0.5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, sigma, loaded.encode(PROMPTS)),
                                   preset.velocity(x, sigma, preset.encode(PROMPTS)), atol=0, rtol=0)


def test_model_defaults_are_sd3s(make_policy, tiny_dir: Path) -> None:
    policy = make_policy(model=str(tiny_dir), lora={"rank": 2}, height=64)
    assert (policy.max_sequence_length, policy.guidance_scale) == (256, 4.5)
    assert policy.compute_dtype == torch.bfloat16 and policy.vae.dtype == torch.bfloat16
    cond = policy.encode(["a cat"])
    assert set(cond) == {"prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                         "negative_pooled_prompt_embeds"}
    assert cond["prompt_embeds"].shape == (1, 16 + 256, 96)  # CLIP tokens + T5 tokens, T5 width
    native = make_policy(model=str(tiny_dir), lora={"rank": 2})
    assert native.height == native.width == 32  # transformer sample_size x VAE scale factor
