"""The z-image options model's defaults and Z-Image's own build-time errors (the common option checks are in
test_zimage_diffusers.py): each names the option key and the fix."""

from __future__ import annotations

import pytest
import torch

from flowfactory.errors import FlowFactoryError
from flowfactory_zimage import Z_IMAGE_LORA_TARGETS, ZImageOptions


def test_defaults() -> None:
    opts = ZImageOptions.model_validate({"model": "Tongyi-MAI/Z-Image-Turbo", "lora": {"rank": 32}})
    assert opts.guidance_scale is None and opts.negative_prompt == "" and opts.lora is not None
    assert (opts.cfg_normalization, opts.cfg_truncation) == (0.0, 1.0)
    assert opts.lora.target_modules == list(Z_IMAGE_LORA_TARGETS) == ["to_q", "to_k", "to_v", "to_out.0"]


def test_size_must_fit_the_patches(make_policy) -> None:
    with pytest.raises(FlowFactoryError, match=r"height=33, width=32.*multiples of 2.*try height: 32"):
        make_policy(height=33, width=32)


def test_caption_must_fit_the_position_table(make_policy) -> None:
    with pytest.raises(FlowFactoryError, match=r"max_sequence_length=1000.*axes_lens\[0\] = 1024.*at most 992"):
        make_policy(max_sequence_length=1000)
    assert make_policy(max_sequence_length=992).max_sequence_length == 992


def test_unknown_lora_target(make_policy) -> None:
    with pytest.raises(FlowFactoryError, match=r"lora.target_modules: \['add_q_proj'\].*feed_forward.w1"):
        make_policy(lora={"target_modules": ["to_q", "add_q_proj"]})


def test_lora_adapts_every_attention_projection(make_policy) -> None:
    policy = make_policy(lora={"rank": 4})
    # 2 main + 2 noise-refiner + 2 context-refiner blocks, 4 projections each, an A and a B per projection
    assert len(policy.trainable_parameters()) == 2 * 4 * 6
    assert sum(p.numel() for p in policy.trainable_parameters()) == 6 * 4 * 4 * (256 + 256)


def test_cfg_velocity_needs_negative_embeddings(make_policy, gens) -> None:
    policy, plain = make_policy(guidance_scale=1.0), make_policy()
    assert policy.do_cfg and not plain.do_cfg  # ZImagePipeline's rule: CFG whenever guidance_scale > 0
    with pytest.raises(KeyError, match="negative prompt"):
        policy.velocity(policy.noise(gens(1)), torch.tensor(0.5), plain.encode(["a cat"]))
