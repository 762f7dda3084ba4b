"""The flux options model's defaults and Flux's own build-time errors (the common option checks are in
test_flux_diffusers.py): each names the option key and the fix."""

from __future__ import annotations

import pytest

from flowfactory.errors import FlowFactoryError
from flowfactory_flux import DEFAULT_LORA_TARGETS, FluxOptions


def test_defaults() -> None:
    opts = FluxOptions.model_validate({"model": "black-forest-labs/FLUX.1-dev", "lora": {"rank": 32}})
    assert opts.guidance_scale == 3.5 and opts.lora is not None and opts.lora.alpha is None
    assert opts.lora.target_modules == list(DEFAULT_LORA_TARGETS)
    assert "to_out.0" in opts.lora.target_modules and "add_q_proj" in opts.lora.target_modules


def test_size_must_fit_packing(make_policy) -> None:
    with pytest.raises(FlowFactoryError, match=r"height=33, width=32.*multiples of 2.*try height: 32"):
        make_policy(height=33)


def test_unknown_lora_target(make_policy) -> None:
    with pytest.raises(FlowFactoryError, match=r"lora.target_modules: \['to_qkv'\]"):
        make_policy(lora={"target_modules": ["to_q", "to_qkv"]})
