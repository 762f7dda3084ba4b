"""flowfactory's diffusers suite on the z-image policy: options, parity with ZImagePipeline (with CFG), LoRA and
full-finetune saves that stock diffusers loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel

from flowfactory.registry import Registry
from flowfactory.testing import override_contract
from flowfactory_diffusers.testing import COMMON_BAD_OPTIONS, DiffusersPolicyContract
from flowfactory_zimage.tiny import build_tiny_pipeline

PROMPTS = ("a red square", "a blue circle")


def call_kwargs(policy: Any) -> dict[str, Any]:
    """ZImagePipeline's arguments for the policy's settings. Its negative prompt must be a list as long as the
    batch (a string is one prompt, and the pipeline asserts the lengths match)."""
    return dict(height=32, width=32, max_sequence_length=64, guidance_scale=policy.guidance_scale,
                negative_prompt=[policy.negative_prompt] * len(PROMPTS), cfg_normalization=policy.cfg_normalization,
                cfg_truncation=policy.cfg_truncation)


class TestZImageDiffusers(DiffusersPolicyContract):
    component = "z-image"
    pipeline_class = ZImagePipeline
    transformer_class = ZImageTransformer2DModel
    tiny_builder = staticmethod(build_tiny_pipeline)
    call_kwargs = staticmethod(call_kwargs)
    prompts = PROMPTS
    model_options = {"height": 32, "max_sequence_length": 64, "guidance_scale": 0.0}  # width defaults to height
    cfg_options = {"guidance_scale": 3.0, "negative_prompt": "a green tree"}
    parity_steps = (1, 3)  # bit-identical at every count tried; 3 keeps the suite quick
    latent_dtype = torch.float32  # as ZImagePipeline.prepare_latents keeps them, whatever the model dtype
    bad_options = (*COMMON_BAD_OPTIONS,
                   ({"preset": "tiny", "true_cfg_scale": 4.0}, "true_cfg_scale"),  # Z-Image's is guidance_scale
                   ({"preset": "tiny", "guidance_scale": -1.0}, "guidance_scale"),
                   ({"preset": "tiny", "cfg_truncation": -0.5}, "cfg_truncation"),
                   ({"preset": "tiny", "lora": {"target_modules": []}}, "lora.target_modules"))
    readme = Path(__file__).resolve().parents[3] / "plugins" / "flowfactory-zimage" / "README.md"

    @override_contract("extends the check: the error also names ZImagePipeline")
    def test_exactly_one_of_model_and_preset(self, registry: Registry) -> None:
        super().test_exactly_one_of_model_and_preset(registry)
        assert "ZImagePipeline" in self._error_text(registry, {})
