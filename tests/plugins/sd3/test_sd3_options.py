"""The sd3 options model's defaults and SD3's own build-time errors (the common option checks are in
test_sd3_diffusers.py): each names the option key and the fix."""

from __future__ import annotations

import pytest

from flowfactory.errors import FlowFactoryError
from flowfactory_sd3 import DEFAULT_LORA_TARGETS, SD3Options


def test_defaults() -> None:
    opts = SD3Options.model_validate({"model": "stabilityai/stable-diffusion-3.5-medium", "lora": {"rank": 32}})
    assert opts.guidance_scale is None and opts.negative_prompt == "" and opts.lora is not None
    assert opts.lora.alpha is None
    assert opts.lora.target_modules == list(DEFAULT_LORA_TARGETS)
    assert "to_out.0" in opts.lora.target_modules and "add_q_proj" in opts.lora.target_modules


def test_size_must_fit_packing(make_policy) -> None:
    with pytest.raises(FlowFactoryError, match=r"height=33, width=32.*multiples of 2.*try height: 32"):
        make_policy(height=33, width=32)


def test_size_must_fit_the_position_table(make_policy) -> None:
    with pytest.raises(FlowFactoryError, match=r"pos_embed_max_size 32.*at most 64 pixels"):
        make_policy(height=128, width=128)


def test_unknown_lora_target(make_policy) -> None:
    with pytest.raises(FlowFactoryError, match=r"lora.target_modules: \['to_qkv'\]"):
        make_policy(lora={"target_modules": ["to_q", "to_qkv"]})
