"""Qwen-Image's noise and schedule match QwenImagePipeline's, prompts reach the transformer (the template prefix
length is recomputed), and a `model:` folder gets its defaults (loading folders and parity with its `__call__`,
with and without true CFG, are in test_qwen_image_diffusers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowfactory_qwen_image.policy import template_prefix_tokens

PROMPTS = ["a red square", "a blue circle"]


def test_noise_and_sigmas_match_the_pipeline(make_policy, gens) -> None:
    policy = make_policy()
    z = policy.noise(gens(3))
    assert z.shape == (3, 256, 16) and z.dtype == torch.float32  # 16x16 tokens of 2x2x4 latent values
    expected = policy.pipe.prepare_latents(3, 4, 32, 32, torch.float32, torch.device("cpu"), gens(3))
    torch.testing.assert_close(z, expected, atol=0, rtol=0)
    s = policy.sigmas(4)
    assert s.shape == (5,) and s[0] == 1.0 and s[-1] == 0.0 and bool((s[1:] < s[:-1]).all())
    assert abs(float(s[-2]) - 0.02) < 1e-6  # Qwen-Image's shift_terminal
    assert float(s[1]) != pytest.approx(0.75)  # shifted: not the plain linspace
    torch.testing.assert_close(policy.sigmas(1), torch.tensor([1.0, 0.0]))  # the scheduler's stretch gives NaN


def test_prompts_change_the_velocity(make_policy, gens) -> None:
    """Catches a wrong template prefix length: dropping too many tokens would leave the prompt out."""
    policy = make_policy()
    prefix = policy.pipe.prompt_template_encode.split("{}")[0]
    assert policy.pipe.prompt_template_encode_start_idx == template_prefix_tokens(policy.pipe) == len(
        policy.pipe.tokenizer(prefix).input_ids) != 34
    cond = policy.encode(PROMPTS)
    mask = cond["prompt_embeds_mask"]
    # what is left after the prefix is the prompt plus the template's suffix, one token per byte here
    suffix = len(policy.pipe.tokenizer(policy.pipe.prompt_template_encode.split("{}")[1]).input_ids)
    assert mask.sum(dim=1).tolist() == [len(p) + suffix for p in PROMPTS]
    x = policy.noise(gens(1)).repeat(2, 1, 1)
    with torch.no_grad():
        v = policy.velocity(x, torch.tensor(0.5), cond)
        same = policy.velocity(x, torch.tensor(0.5), {k: c[[0, 0]] for k, c in cond.items()})
    assert (v[0] - v[1]).abs().max() > 1e-3
    torch.testing.assert_close(same[0], same[1], atol=1e-6, rtol=0)


def test_model_defaults_are_qwen_images(make_policy, tiny_dir: Path) -> None:
    policy = make_policy(model=str(tiny_dir), lora={"rank": 2}, height=32)
    assert policy.width == 32  # width defaults to height
    assert (policy.max_sequence_length, policy.true_cfg_scale, policy.negative_prompt) == (512, 4.0, " ")
    assert policy.compute_dtype == torch.bfloat16 and policy.vae.dtype == torch.bfloat16
    cond = policy.encode(["a cat"])
    assert set(cond) == {"prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds",
                         "negative_prompt_embeds_mask"}
    assert cond["prompt_embeds"].shape == (1, 512, 64)
    native = make_policy(model=str(tiny_dir), lora={"rank": 2})
    assert native.height == native.width == 128 * native.vae_scale_factor  # QwenImagePipeline's default size
