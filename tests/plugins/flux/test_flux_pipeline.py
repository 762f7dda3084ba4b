"""Parity with diffusers: an ODE rollout of the policy equals FluxPipeline.__call__, and `model:` loads folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline

from flowfactory.samplers.flow import ODESampler
from flowfactory_flux.tiny import TinyFluxSpec, build_tiny_pipeline

PROMPTS = ["a red square", "a blue circle"]


def rollout_images(policy, steps: int, z: torch.Tensor, gens) -> torch.Tensor:
    cond = policy.encode(PROMPTS)
    traj = ODESampler(steps).rollout(policy, cond, z, gens(len(PROMPTS)), keep="final", deterministic=True)
    return policy.decode(traj.final)


def pipeline_images(pipe: FluxPipeline, steps: int, z: torch.Tensor, **kwargs) -> torch.Tensor:
    return pipe(PROMPTS, height=32, width=32, num_inference_steps=steps, max_sequence_length=32,
                latents=z.clone(), output_type="pt", **kwargs).images


@pytest.mark.parametrize("steps", [1, 5])
def test_ode_rollout_equals_flux_pipeline(make_policy, tiny_dir: Path, gens, steps: int) -> None:
    policy = make_policy()  # preset tiny, seed 0: the same weights as tiny_dir, built independently
    z = policy.noise(gens(2))
    ours = rollout_images(policy, steps, z, gens)
    theirs = pipeline_images(FluxPipeline.from_pretrained(tiny_dir), steps, z)
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert (ours - theirs).abs().max() < 1e-4
    assert ours.std() > 0.01  # not a constant image


def test_model_path_loads_a_saved_pipeline(make_policy, tiny_dir: Path, gens) -> None:
    loaded = make_policy(model=str(tiny_dir), dtype="float32", height=32, width=32, max_sequence_length=32)
    preset = make_policy()
    x, sigma = preset.noise(gens(2)), torch.tensor(0.5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, sigma, loaded.encode(PROMPTS)),
                                   preset.velocity(x, sigma, preset.encode(PROMPTS)), atol=0, rtol=0)


def test_model_defaults_are_flux1s(make_policy, tiny_dir: Path) -> None:
    policy = make_policy(model=str(tiny_dir), lora={"rank": 2})
    assert (policy.height, policy.width, policy.max_sequence_length) == (512, 512, 512)
    assert policy.latent_shape == (256 * 256, 16)  # VAE scale 1: 512 / 2 patches per side, 4 latent channels x 2x2
    assert policy.compute_dtype == torch.bfloat16 and policy.vae.dtype == torch.bfloat16
    assert policy.encode(["a cat"])["prompt_embeds"].shape == (1, 512, 64)


def test_distilled_guidance_matches_the_pipeline(make_policy, tmp_path: Path, gens) -> None:
    """A FLUX.1-dev-like transformer (guidance_embeds): guidance_scale reaches it exactly as in diffusers."""
    path = tmp_path / "tiny-dev"
    build_tiny_pipeline(3, TinyFluxSpec(guidance_embeds=True)).save_pretrained(path)
    opts = dict(model=str(path), dtype="float32", height=32, width=32, max_sequence_length=32)
    policy = make_policy(guidance_scale=2.0, **opts)
    z = policy.noise(gens(2))
    ours = rollout_images(policy, 3, z, gens)
    theirs = pipeline_images(FluxPipeline.from_pretrained(path), 3, z, guidance_scale=2.0)
    assert (ours - theirs).abs().max() < 1e-4
    other = make_policy(guidance_scale=5.0, **opts)
    cond, sigma = policy.encode(PROMPTS), torch.tensor(0.5)
    with torch.no_grad():
        assert (policy.velocity(z, sigma, cond) - other.velocity(z, sigma, cond)).abs().max() > 1e-4
