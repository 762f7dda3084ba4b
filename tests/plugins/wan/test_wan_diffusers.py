"""flowfactory's diffusers suite on the wan policy (one expert): options, parity with WanPipeline (with CFG),
LoRA and full-finetune saves that stock diffusers loads. Wan 2.2's two experts are in test_wan_experts.py and
test_wan_save.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import WanPipeline, WanTransformer3DModel
from torch import nn

from flowfactory.registry import Registry
from flowfactory.testing import override_contract
from flowfactory_diffusers.testing import DiffusersPolicyContract
from flowfactory_wan.tiny import build_tiny_pipeline


def call_kwargs(policy: Any) -> dict[str, Any]:
    return dict(height=16, width=16, num_frames=5, max_sequence_length=16, guidance_scale=policy.guidance_scale,
                negative_prompt=policy.negative_prompt)


class TestWanDiffusers(DiffusersPolicyContract):
    component = "wan"
    pipeline_class = WanPipeline
    transformer_class = WanTransformer3DModel
    tiny_builder = staticmethod(build_tiny_pipeline)
    call_kwargs = staticmethod(call_kwargs)
    output = "frames"
    model_options = {"height": 16, "width": 16, "num_frames": 5, "max_sequence_length": 16, "guidance_scale": 1.0}
    cfg_options = {"guidance_scale": 4.0, "negative_prompt": "a green tree"}
    parity_steps = (1, 4)
    latent_dtype = torch.float32  # as WanPipeline.prepare_latents, whatever the model's dtype
    readme = Path(__file__).resolve().parents[3] / "plugins" / "flowfactory-wan" / "README.md"

    def as_module(self, policy: Any, transformer: nn.Module) -> nn.Module:
        """`policy.module` holds the experts; a bare transformer is the only one."""
        from flowfactory_wan.policy import WanExperts

        return WanExperts(transformer)

    @override_contract("the package README documents wan and wan-i2v: each config validates against its own policy")
    def test_readme_configs_validate_and_table_lists_every_option(self, registry: Registry,
                                                                    check_wan_readme: Any) -> None:
        check_wan_readme(registry, self.component)
