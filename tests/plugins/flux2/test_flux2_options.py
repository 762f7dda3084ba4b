"""The flux2 and flux2-klein options models' defaults and FLUX.2's own build-time errors (the common option checks
are in test_flux2_diffusers.py): each names the option key and the fix."""

from __future__ import annotations

import pytest

from flowfactory.errors import FlowFactoryError
from flowfactory_flux2 import FLUX2_LORA_TARGETS, Flux2KleinOptions, Flux2Options


def test_defaults() -> None:
    dev = Flux2Options.model_validate({"model": "black-forest-labs/FLUX.2-dev", "lora": {"rank": 32}})
    assert dev.guidance_scale == 4.0 and dev.height is None and dev.max_sequence_length is None
    assert dev.lora is not None and dev.lora.target_modules == list(FLUX2_LORA_TARGETS)
    assert "to_qkv_mlp_proj" in dev.lora.target_modules and "add_q_proj" in dev.lora.target_modules
    klein = Flux2KleinOptions.model_validate({"model": "black-forest-labs/FLUX.2-klein-base-9B"})
    assert klein.guidance_scale is None and klein.lora is None  # null: 4.0, or 1.0 for a distilled model


def test_size_must_fit_the_patches(make_flux2) -> None:
    with pytest.raises(FlowFactoryError, match=r"height=33, width=32.*multiples of 2 .*try height: 32"):
        make_flux2(height=33, width=32)


def test_unknown_lora_target_names_the_flux2_modules(make_klein) -> None:
    with pytest.raises(FlowFactoryError, match=r"lora.target_modules: \['to_qkv'\].*to_qkv_mlp_proj"):
        make_klein(lora={"target_modules": ["to_q", "to_qkv"]})
