"""`ff plan` for the FLUX.2 policies: each tiny preset's plan agrees with its built policy, and the stored FLUX.2
[dev] configs (tests/data/model-configs/flux.2-dev: config files only, written from the library defaults, which
are FLUX.2 [dev]'s) give its real parameter counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from flowfactory import config as ff_config
from flowfactory.plan import dtype_name, plan_memory
from flowfactory.registry import BuildContext, Registry

CONFIGS = Path(__file__).parents[2] / "data" / "model-configs"
FLUX2_DEV_TRANSFORMER = 32_223_281_152
MISTRAL_SMALL = 24_011_361_280  # Mistral3ForConditionalGeneration: Mistral Small 3.x 24B with its Pixtral tower
FLUX2_VAE = 84_046_115


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("name,options", [
    ("flux2", {"preset": "tiny"}),
    ("flux2-klein", {"preset": "tiny", "guidance_scale": 4.0, "lora": {"rank": 2}}),
])
def test_tiny_presets_plan_like_their_built_policy(flux2_registry: Registry, name: str,
                                                   options: dict[str, Any]) -> None:
    spec = flux2_registry.get("policy", name)
    opts = spec.validate_options(options)
    plan = spec.plan(opts, BuildContext(seed=0, reference=True))
    policy = spec.create(opts, BuildContext(seed=0, reference=True))
    noise = policy.noise([torch.Generator().manual_seed(0)])
    assert plan.latent_shape == tuple(policy.latent_shape) and plan.latent_dtype == dtype_name(noise.dtype)
    cond = policy.encode(["a red square"])
    assert {k: (tuple(v.shape[1:]), dtype_name(v.dtype)) for k, v in cond.items()} == dict(plan.conditioning)
    trained = [p for p in plan.parts if p.role == "trained"]
    assert sum(p.trainable_bytes for p in trained) == nbytes(*policy.trainable_parameters())
    frozen = {p.name: p.frozen_bytes for p in plan.parts if p.role in ("text encoder", "vae")}
    module = {n: getattr(policy.pipe, n) for n in frozen}
    assert frozen == {n: nbytes(*m.parameters(), *m.buffers()) for n, m in module.items()}
    with torch.no_grad():
        assert plan.sample_shape == tuple(policy.decode(noise).shape[1:])


def test_flux2_dev_config_has_32b_transformer_parameters(flux2_registry: Registry) -> None:
    def plan_of(**options: Any) -> Any:
        data = {"policy": {"name": "flux2", "options": {"model": str(CONFIGS / "flux.2-dev"), **options}},
                "sampler": {"name": "flow-sde", "options": {"steps": 3}}, "rewards": [{"name": "brightness"}],
                "optimizer": {"name": "grpo", "options": {"kl_beta": 0.0}}, "data": {"train": "colours", "eval": None},
                "train": {"prompts_per_epoch": 8, "group_size": 2}}
        cfg, opts = ff_config.validate(data, "<test>", flux2_registry)
        return plan_memory(cfg, opts, flux2_registry, 1)

    full = plan_of()
    parts = {p.name: (p.parameters, p.trainable_elements) for p in full.parts}
    assert parts == {"transformer": (FLUX2_DEV_TRANSFORMER, FLUX2_DEV_TRANSFORMER), "text_encoder": (MISTRAL_SMALL, 0),
                     "vae": (FLUX2_VAE, 0)}
    assert full.row("trainable parameters").bytes == 4 * FLUX2_DEV_TRANSFORMER  # float32 master weights
    lora = plan_of(lora={"rank": 32}, height=512, width=512)
    adapter = lora.parts[0].trainable_elements
    # rank 32 on 8 double blocks (4 image + 4 text projections of 6144 x 6144) and 48 single blocks' to_qkv_mlp_proj
    # (6144 -> 3 x 6144 + 2 x 3 x 6144 SwiGLU halves)
    assert adapter == 32 * (8 * 8 * (6144 + 6144) + 48 * (6144 + 9 * 6144))
    assert lora.row("frozen transformer weights").bytes == 2 * FLUX2_DEV_TRANSFORMER  # bfloat16 base
    # 512x512: 32x32 tokens of 128 channels; Mistral's layers 10, 20, 30 stacked: [512, 3 x 5120] bfloat16 a prompt
    assert "[1024, 128] bfloat16" in lora.row("rollout buffer").detail
    from flowfactory.train.data import load_prompts

    prompts = len(set(load_prompts("colours", None, "data.train")))
    assert lora.row("conditioning cache").bytes == prompts * 2 * 512 * 15360


def test_klein_plan_counts_the_empty_prompts_rows_unless_distilled(flux2_registry: Registry, klein_dir: Path,
                                                                   tmp_path: Path) -> None:
    """A base klein's default CFG keeps the empty prompt's rows per prompt; a step-distilled one (is_distilled in
    model_index.json) has no CFG, so no such rows."""
    import json
    import shutil

    spec = flux2_registry.get("policy", "flux2-klein")

    def conditioning(folder: Path) -> dict[str, Any]:
        opts = spec.validate_options({"model": str(folder), "height": 64})
        return dict(spec.plan(opts, BuildContext(seed=0)).conditioning)

    rows = ((512, 96), "bfloat16")  # 512 tokens of three 32-wide Qwen3 layers
    assert conditioning(klein_dir) == {"prompt_embeds": rows, "negative_prompt_embeds": rows}
    distilled = tmp_path / "distilled"
    shutil.copytree(klein_dir, distilled)
    index = json.loads((distilled / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    assert conditioning(distilled) == {"prompt_embeds": rows}
