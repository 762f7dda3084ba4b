"""A `model:` folder gets FLUX.1's defaults, and distilled guidance matches FluxPipeline (loading folders and
parity of the plain rollout with FluxPipeline.__call__ are in test_flux_diffusers.py)."""

from __future__ import annotations

from pathlib import Path

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
