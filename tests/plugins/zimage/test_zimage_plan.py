"""`ff plan` for z-image: the tiny preset's plan agrees with its built policy, and the stored Z-Image-Turbo configs
(tests/data/model-configs/z-image-turbo, config files only) give the model's real parameter counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from flowfactory.plan import PolicyPlan, dtype_name
from flowfactory.plugins import get_registry
from flowfactory.registry import BuildContext

CONFIGS = Path(__file__).parents[2] / "data" / "model-configs" / "z-image-turbo"
TRANSFORMER = 6_154_908_736  # Z-Image's 6B single-stream transformer
TEXT_ENCODER = 4_022_468_096  # Qwen3-4B without its LM head
VAE = 83_819_683  # FLUX.1's VAE


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("options", [{"preset": "tiny"}, {"preset": "tiny", "guidance_scale": 2.0, "lora": {"rank": 2}},
                                     {"preset": "tiny", "height": 36}], ids=["full", "cfg-lora", "padded"])
def test_tiny_plan_is_the_built_policy(options: dict[str, Any]) -> None:
    spec = get_registry().get("policy", "z-image")
    opts = spec.validate_options(options)
    plan: PolicyPlan = spec.plan(opts, BuildContext(seed=0, reference=True))
    policy = spec.create(opts, BuildContext(seed=0, reference=True))
    assert plan.latent_shape == tuple(policy.latent_shape)
    noise = policy.noise([torch.Generator().manual_seed(0)])
    assert plan.latent_dtype == dtype_name(noise.dtype) == "float32"
    cond = policy.encode(["a red square"])
    assert {k: (tuple(v.shape[1:]), dtype_name(v.dtype)) for k, v in cond.items()} == dict(plan.conditioning)
    trained = [p for p in plan.parts if p.role == "trained"]
    assert sum(p.trainable_bytes for p in trained) == nbytes(*policy.trainable_parameters())
    frozen = {p.name: p.frozen_bytes for p in plan.parts if p.role in ("text encoder", "vae")}
    assert frozen == {n: nbytes(*getattr(policy.pipe, n).parameters(), *getattr(policy.pipe, n).buffers())
                      for n in frozen}
    with torch.no_grad():
        assert plan.sample_shape == tuple(policy.decode(noise).shape[1:])


def plan_of(**options: Any) -> PolicyPlan:
    spec = get_registry().get("policy", "z-image")
    opts = spec.validate_options({"model": str(CONFIGS), **options})
    return spec.plan(opts, BuildContext(seed=0, reference=False))


def test_z_image_turbo_configs() -> None:
    full = plan_of()
    parts = {p.name: (p.parameters, p.trainable_elements) for p in full.parts}
    # full finetune at the native 1024 px: every transformer weight but x_pad_token (64 x 64 patches, no padding)
    assert parts == {"transformer": (TRANSFORMER, TRANSFORMER - 3840), "text_encoder": (TEXT_ENCODER, 0),
                     "vae": (VAE, 0)}
    assert full.latent_shape == (16, 128, 128) and full.sample_shape == (3, 1024, 1024)
    # guidance_scale null means the pipeline's 5.0: negative rows too
    assert dict(full.conditioning) == {k: v for p in ("", "negative_") for k, v in
                                       {f"{p}prompt_embeds": ((512, 2560), "bfloat16"),
                                        f"{p}prompt_embeds_mask": ((512,), "int64")}.items()}
    turbo = plan_of(height=512, guidance_scale=0.0, lora={"rank": 32})
    transformer = turbo.parts[0]
    # rank 32 on to_q, to_k, to_v, to_out.0 (3840 -> 3840) of 30 + 2 + 2 blocks
    assert transformer.trainable_elements == 34 * 4 * 32 * (3840 + 3840)
    assert transformer.parameters - transformer.trainable_elements == TRANSFORMER
    assert turbo.latent_shape == (16, 64, 64) and set(turbo.conditioning) == {"prompt_embeds", "prompt_embeds_mask"}
