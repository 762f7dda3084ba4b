"""flowfactory's diffusers suite on the wan-i2v policy (the tiny Wan 2.1 I2V: a CLIP image encoder, one expert)
with prompt records carrying input images: parity with WanImageToVideoPipeline from the same noise and image (with
and without CFG), LoRA and full-finetune saves it loads. First-last-frame, Wan 2.2's two experts and what is
the policy's own are in test_wan_i2v.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
from torch import nn
from wan_frames import pil, write_frames

from flowfactory.prompts import Prompt
from flowfactory.registry import Registry
from flowfactory.testing import override_contract
from flowfactory_diffusers.testing import COMMON_BAD_OPTIONS, DiffusersPolicyContract
from flowfactory_wan.tiny import build_tiny_i2v_pipeline

SIZE, FRAMES = 16, 5


def call_kwargs(policy: Any) -> dict[str, Any]:
    return dict(height=SIZE, width=SIZE, num_frames=FRAMES, max_sequence_length=512,
                guidance_scale=policy.guidance_scale, negative_prompt=policy.negative_prompt)


class TestWanI2VDiffusers(DiffusersPolicyContract):
    component = "wan-i2v"
    pipeline_class = WanImageToVideoPipeline
    transformer_class = WanTransformer3DModel
    tiny_builder = staticmethod(build_tiny_i2v_pipeline)
    call_kwargs = staticmethod(call_kwargs)
    output = "frames"
    model_options = {"height": SIZE, "width": SIZE, "num_frames": FRAMES, "guidance_scale": 1.0}
    cfg_options = {"guidance_scale": 4.0, "negative_prompt": "a green tree"}
    parity_steps = (1, 3)
    latent_dtype = torch.float32  # as WanImageToVideoPipeline.prepare_latents, whatever the model's dtype
    bad_options = (*COMMON_BAD_OPTIONS, ({"preset": "tiny", "max_sequence_length": 600}, "max_sequence_length"),
                   ({"preset": "tiny", "tiny_experts": 3}, "tiny_experts"))
    # the tiny Wan 2.1 I2V needs 512 text tokens; the input images' size and the frame count change encode
    encode_option_changes = ({"dtype": "bfloat16"}, {"height": 32}, {"num_frames": 3})

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _records(cls, tmp_path_factory: pytest.TempPathFactory) -> None:
        """Two records, each with its own first frame (of different sizes: both are resized to 16x16)."""
        square, bar, _ = write_frames(tmp_path_factory.mktemp("i2v-frames"))
        cls.prompts = (Prompt("a red square", images=[square]), Prompt("a blue bar", images=[bar]))

    def stock_call(self, pipe: Any, policy: Any, steps: int, z: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """One pipeline call per record (the pipeline takes one image for its whole batch): its image opened as
        a user would, its row of the latents."""
        call = {**self.pipeline_kwargs(policy), "output_type": "pt", **kwargs}
        out = []
        for i, record in enumerate(self.prompts):
            assert isinstance(record, Prompt)
            result = pipe(image=pil(record.images[0]), prompt=record.text, num_inference_steps=steps,
                          latents=z[i:i + 1].clone(), **call)
            out.append(getattr(result, self.output))
        return torch.cat(out)

    def as_module(self, policy: Any, transformer: nn.Module) -> nn.Module:
        from flowfactory_wan.policy import WanExperts

        return WanExperts(transformer)

    @override_contract("the package README documents wan and wan-i2v: each config validates against its own policy")
    def test_readme_configs_validate_and_table_lists_every_option(self, registry: Registry,
                                                                    check_wan_readme: Any) -> None:
        check_wan_readme(registry, self.component)


def test_stock_dir_is_the_tiny_preset(tmp_path: Path) -> None:
    """The suite compares against the builder's folder: the preset's image parts are the builder's."""
    a, b = build_tiny_i2v_pipeline(0), build_tiny_i2v_pipeline(0)
    for name in ("transformer", "image_encoder", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
