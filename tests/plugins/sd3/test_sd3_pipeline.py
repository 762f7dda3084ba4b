"""A `model:` folder gets StableDiffusion3Pipeline's defaults (loading folders and parity with its `__call__`, with
and without CFG, are in test_sd3_diffusers.py)."""

from __future__ import annotations

from pathlib import Path

import torch

PROMPTS = ["a red square", "a blue circle"]


def test_model_defaults_are_sd3s(make_policy, tiny_dir: Path) -> None:
    policy = make_policy(model=str(tiny_dir), lora={"rank": 2}, height=64)
    assert policy.width == 64  # width defaults to height
    assert (policy.max_sequence_length, policy.guidance_scale) == (256, 4.5)
    assert policy.compute_dtype == torch.bfloat16 and policy.vae.dtype == torch.bfloat16
    cond = policy.encode(["a cat"])
    assert set(cond) == {"prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                         "negative_pooled_prompt_embeds"}
    assert cond["prompt_embeds"].shape == (1, 16 + 256, 96)  # CLIP tokens + T5 tokens, T5 width
    native = make_policy(model=str(tiny_dir), lora={"rank": 2})
    assert native.height == native.width == 32  # transformer sample_size x VAE scale factor
