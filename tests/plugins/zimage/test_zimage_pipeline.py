"""Z-Image's own behaviour (the shared suite in test_zimage_diffusers.py checks parity with ZImagePipeline with
and without CFG, loading and saves): noise and schedules as the pipeline computes them, variable-length captions
that reach the transformer, CFG truncation and normalisation as the pipeline applies them, and a `model:` folder's
defaults."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from flowfactory.errors import FlowFactoryError
from flowfactory.samplers.flow import ODESampler

PROMPTS = ["a red square", "a blue circle"]
# bytes of the chat template around the prompt: "<|im_start|>user\n" and "<|im_end|>\n<|im_start|>assistant\n",
# one token per byte (special tokens one each) with the tiny byte-level tokenizer
TEMPLATE_TOKENS = (1 + 5) + (1 + 1 + 1 + 10)


def test_noise_and_sigmas_match_the_pipeline(make_policy, gens) -> None:
    policy = make_policy()
    z = policy.noise(gens(3))
    assert z.shape == (3, 4, 32, 32) and z.dtype == torch.float32
    expected = policy.pipe.prepare_latents(3, 4, 32, 32, torch.float32, torch.device("cpu"), gens(3))
    torch.testing.assert_close(z, expected, atol=0, rtol=0)
    # Z-Image-Turbo's static shift 3 on linspace(1, 1/n, n): 3s / (1 + 2s)
    s = [1.0, 0.75, 0.5, 0.25]
    torch.testing.assert_close(policy.sigmas(4), torch.tensor([3 * v / (1 + 2 * v) for v in s] + [0.0]))
    torch.testing.assert_close(policy.sigmas(1), torch.tensor([1.0, 0.0]))
    assert make_policy(dtype="bfloat16", lora={"rank": 2}).noise(gens(1)).dtype == torch.float32


def test_dynamic_shift_takes_mu_from_the_image_tokens(make_policy, tiny_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "dynamic"
    shutil.copytree(tiny_dir, folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_dynamic_shifting": True}))
    policy = make_policy(model=str(folder), height=64, dtype="float32", guidance_scale=0.0)
    tokens = (64 // 2) ** 2  # 2x2 patches of 64x64 latents at VAE scale 1
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)  # the scheduler defaults' linear shift
    s = [1.0, 2 / 3, 1 / 3]
    expected = [math.exp(mu) / (math.exp(mu) + (1 / v - 1)) for v in s] + [0.0]
    torch.testing.assert_close(policy.sigmas(3), torch.tensor(expected), atol=1e-6, rtol=0)


def test_captions_are_the_real_tokens_and_reach_the_velocity(make_policy, gens) -> None:
    policy = make_policy()
    cond = policy.encode(PROMPTS)
    mask = cond["prompt_embeds_mask"]
    assert cond["prompt_embeds"].shape == (2, 64, 64) and mask.dtype == torch.int64
    assert mask.sum(dim=1).tolist() == [len(p) + TEMPLATE_TOKENS for p in PROMPTS]
    stock = policy.pipe._encode_prompt(list(PROMPTS), max_sequence_length=64)  # what the pipeline feeds
    for row, m, e in zip(cond["prompt_embeds"], mask, stock, strict=True):
        torch.testing.assert_close(row[m.bool()], e, atol=0, rtol=0)
        assert not row[~m.bool()].any()  # zero padding
    x = policy.noise(gens(1)).repeat(2, 1, 1, 1)
    with torch.no_grad():
        v = policy.velocity(x, torch.tensor(0.5), cond)
        same = policy.velocity(x, torch.tensor(0.5), {k: c[[0, 0]] for k, c in cond.items()})
    assert (v[0] - v[1]).abs().max() > 1e-3
    torch.testing.assert_close(same[0], same[1], atol=1e-6, rtol=0)
    short = make_policy(max_sequence_length=8).encode(PROMPTS)["prompt_embeds_mask"]
    assert short.shape == (2, 8) and short.sum(dim=1).tolist() == [8, 8]  # truncated to max_sequence_length


def test_cfg_truncation_drops_guidance_at_the_late_steps(make_policy, gens) -> None:
    """ZImagePipeline skips CFG where (1000 - 1000 sigma) / 1000 > cfg_truncation: there the velocity is the
    conditional one; per-row sigmas mix guided and unguided rows."""
    plain, guided = make_policy(), make_policy(guidance_scale=3.0, cfg_truncation=0.2)
    cond = guided.encode(PROMPTS)
    x = guided.noise(gens(2))
    with torch.no_grad():
        late = guided.velocity(x, torch.tensor(0.5), cond)  # 1 - sigma = 0.5 > 0.2: no CFG
        torch.testing.assert_close(late, plain.velocity(x, torch.tensor(0.5), plain.encode(PROMPTS)), atol=0, rtol=0)
        early = guided.velocity(x, torch.tensor(0.9), cond)  # 0.1 <= 0.2: CFG
        assert (early - plain.velocity(x, torch.tensor(0.9), plain.encode(PROMPTS))).abs().max() > 1e-3
        mixed = guided.velocity(x, torch.tensor([0.9, 0.5]), cond)
    torch.testing.assert_close(mixed[0], early[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], late[1], atol=1e-5, rtol=0)


def test_cfg_normalization_and_truncation_rollout_equals_the_pipeline(make_policy, tiny_dir: Path) -> None:
    from diffusers import ZImagePipeline

    from flowfactory.testing.contracts import make_generators

    pipe = ZImagePipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    options = dict(guidance_scale=4.0, cfg_normalization=1.0, cfg_truncation=0.2, negative_prompt="a dog")
    policy = make_policy(**options)
    z = policy.noise(make_generators(range(2)))
    final = ODESampler(4).rollout(policy, policy.encode(PROMPTS), z, make_generators(range(2)), keep="final",
                                  deterministic=True).final
    theirs = pipe(list(PROMPTS), height=32, width=32, num_inference_steps=4, latents=z.clone(), output_type="latent",
                  max_sequence_length=64, **{**options, "negative_prompt": ["a dog"] * 2}).images
    assert (final - theirs).abs().max() < 1e-5
    free = pipe(list(PROMPTS), height=32, width=32, num_inference_steps=4, latents=z.clone(), output_type="latent",
                max_sequence_length=64, guidance_scale=4.0, negative_prompt=["a dog"] * 2).images
    assert (final - free).abs().max() > 1e-3  # normalisation and truncation changed the sample


def test_full_finetune_trains_x_pad_token_only_where_images_are_padded(make_policy, perturb) -> None:
    def trainable(policy) -> set[str]:
        ids = {id(p) for p in policy.trainable_parameters()}
        return {n for n, p in policy.transformer.named_parameters() if id(p) in ids}

    policy = make_policy()  # 32 px: 16 x 16 = 256 patches, a multiple of 32
    names = {n for n, _ in policy.transformer.named_parameters()}
    assert names - trainable(policy) == {"x_pad_token"}
    assert 6.3e6 < sum(p.numel() for p in policy.trainable_parameters()) < 6.5e6
    padded = make_policy(height=36)  # 18 x 18 latents: 81 patches, padded to 96
    assert trainable(padded) == names
    x, cond = padded.noise([torch.Generator().manual_seed(0)]), padded.encode(PROMPTS[:1])
    padded.velocity(x, torch.tensor(0.5), cond).pow(2).mean().backward()
    assert padded.transformer.x_pad_token.grad.abs().sum() > 0
    assert make_policy(lora={"rank": 2}).transformer.x_pad_token.requires_grad is False  # LoRA: all base frozen


def test_model_defaults_are_the_pipelines(make_policy, tiny_dir: Path) -> None:
    policy = make_policy(model=str(tiny_dir), lora={"rank": 2}, height=32)
    assert policy.width == 32  # width defaults to height
    assert (policy.max_sequence_length, policy.guidance_scale, policy.negative_prompt) == (512, 5.0, "")
    assert (policy.cfg_normalization, policy.cfg_truncation) == (0.0, 1.0)
    assert policy.compute_dtype == torch.bfloat16 and policy.vae.dtype == torch.bfloat16
    cond = policy.encode(["a cat"])
    assert set(cond) == {"prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds",
                         "negative_prompt_embeds_mask"}
    assert cond["prompt_embeds"].shape == (1, 512, 64)
    # the native 1024 px is 512 patches a side: beyond the tiny transformer's position table (128)
    with pytest.raises(FlowFactoryError, match=r"height=1024, width=1024.*axes_lens \[128, 128\].*256 x 256"):
        make_policy(model=str(tiny_dir), lora={"rank": 2})
