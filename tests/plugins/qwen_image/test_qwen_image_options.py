"""The qwen-image options model's defaults and Qwen-Image's own build-time errors (the common option checks are
in test_qwen_image_diffusers.py): each names the option key and the fix."""

from __future__ import annotations

import pytest

from flowfactory.errors import FlowFactoryError
from flowfactory_diffusers.options import DEFAULT_LORA_TARGETS
from flowfactory_qwen_image import QWEN_IMAGE_LORA_TARGETS, QwenImageOptions


def test_defaults() -> None:
    opts = QwenImageOptions.model_validate({"model": "Qwen/Qwen-Image", "lora": {"rank": 32}})
    assert opts.true_cfg_scale is None and opts.negative_prompt == " " and opts.lora is not None
    assert opts.lora.target_modules == list(DEFAULT_LORA_TARGETS) == list(QWEN_IMAGE_LORA_TARGETS)


def test_size_must_fit_packing(make_policy) -> None:
    with pytest.raises(FlowFactoryError, match=r"height=33, width=32.*multiples of 2.*try height: 32"):
        make_policy(height=33, width=32)


def test_unknown_lora_target(make_policy) -> None:
    with pytest.raises(FlowFactoryError, match=r"lora.target_modules: \['to_qkv'\].*img_mlp"):
        make_policy(lora={"target_modules": ["to_q", "to_qkv"]})


def test_cfg_velocity_needs_negative_embeddings(make_policy, gens) -> None:
    import torch

    policy, plain = make_policy(true_cfg_scale=4.0), make_policy()
    with pytest.raises(KeyError, match="negative prompt"):
        policy.velocity(policy.noise(gens(1)), torch.tensor(0.5), plain.encode(["a cat"]))
