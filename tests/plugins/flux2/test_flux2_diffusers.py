"""flowfactory's diffusers suite on flux2 and flux2-klein: options, parity with Flux2Pipeline and Flux2KleinPipeline
(klein with CFG), LoRA and full-finetune saves that stock diffusers loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import Flux2SingleTransformerBlock, Flux2TransformerBlock

from flowfactory.prompts import texts
from flowfactory.registry import Registry
from flowfactory.testing import override_contract
from flowfactory_diffusers.testing import COMMON_BAD_OPTIONS, DiffusersPolicyContract
from flowfactory_flux2.tiny import build_tiny_klein_pipeline, build_tiny_pipeline

README = Path(__file__).resolve().parents[3] / "plugins" / "flowfactory-flux2" / "README.md"
SIZE = {"height": 16, "width": 16, "max_sequence_length": 48}  # 8x8 image tokens: a quarter of the preset's 32x32


def call_kwargs(policy: Any) -> dict[str, Any]:
    return {**SIZE, "guidance_scale": policy.guidance_scale}


def repack_klein_latents(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Flux2KleinPipeline's `output_type="latent"` is un-normalised and un-patchified [B, C, H, W]; back to the
    packed, normalised tokens the policy rolls out (Flux2Pipeline returns those as they are)."""
    bn = pipe.vae.bn
    patches = Flux2Pipeline._patchify_latents(latents)
    mean = bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    return Flux2Pipeline._pack_latents((patches - mean) / std)


class _Flux2Suite(DiffusersPolicyContract):
    """What both FLUX.2 suites share: the pipelines' `latents=` is the patchified grid, which `policy.unpack` gives,
    and klein's latent output is un-normalised."""

    transformer_class = Flux2Transformer2DModel
    options = {"preset": "tiny", "height": 16}  # width follows height
    call_kwargs = staticmethod(call_kwargs)
    readme = README
    bad_options = (*COMMON_BAD_OPTIONS,
                   ({"preset": "tiny", "max_sequence_length": 0}, "max_sequence_length"),
                   ({"preset": "tiny", "guidance_scale": -1.0}, "guidance_scale"),
                   ({"preset": "tiny", "true_cfg_scale": 4.0}, "true_cfg_scale"))  # FLUX.2's is guidance_scale

    def stock_call(self, pipe: Any, policy: Any, steps: int, z: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        kwargs = {**self.pipeline_kwargs(policy), **self.stock_inputs(policy), "output_type": "pt", **kwargs}
        out = pipe(prompt=texts(self.prompts), num_inference_steps=steps, latents=policy.unpack(z), **kwargs).images
        if kwargs["output_type"] == "latent" and isinstance(pipe, Flux2KleinPipeline):
            return repack_klein_latents(pipe, out)
        return out


class TestFlux2Diffusers(_Flux2Suite):
    component = "flux2"
    pipeline_class = Flux2Pipeline
    tiny_builder = staticmethod(build_tiny_pipeline)
    model_options = {"height": 16, "max_sequence_length": 48}

    @override_contract("extends the check: the error also names Flux2Pipeline")
    def test_exactly_one_of_model_and_preset(self, registry: Registry) -> None:
        super().test_exactly_one_of_model_and_preset(registry)
        assert "Flux2Pipeline" in self._error_text(registry, {})


class TestFlux2KleinDiffusers(_Flux2Suite):
    component = "flux2-klein"
    pipeline_class = Flux2KleinPipeline
    tiny_builder = staticmethod(build_tiny_klein_pipeline)
    model_options = {"height": 16, "max_sequence_length": 48, "guidance_scale": 1.0}
    cfg_options = {"guidance_scale": 4.0}
    parity_steps = (1, 4)


# --- what is FLUX.2's own -----------------------------------------------------------------------------------

def test_full_finetune_trains_the_whole_transformer(make_flux2, make_klein) -> None:
    for policy in (make_flux2(), make_klein()):
        trainable = policy.trainable_parameters()
        assert len(trainable) == len(list(policy.transformer.parameters()))  # no dead modules
        assert 6e6 < sum(p.numel() for p in trainable) < 7e6
        assert policy.fsdp_block_classes == (Flux2TransformerBlock, Flux2SingleTransformerBlock)
    # klein's transformer has no guidance embedder: FLUX.2 [dev]'s has one of 2 x (256 x 256 + 256 x 256) weights
    assert sum(p.numel() for p in make_flux2().trainable_parameters()) - sum(
        p.numel() for p in make_klein().trainable_parameters()) == 256 * 256 + 256 * 256


def test_lora_adapts_every_attention_projection(make_flux2) -> None:
    policy = make_flux2(lora={"rank": 4, "alpha": 8.0})
    names = [n for n, _ in policy.transformer.named_parameters() if "lora_A" in n]
    # 2 double blocks x 8 projections (both streams) + 2 single blocks x the fused to_qkv_mlp_proj
    assert len(names) == 2 * 8 + 2 and len(policy.trainable_parameters()) == 2 * len(names)
    assert sum("to_qkv_mlp_proj" in n for n in names) == 2
    per_block = make_flux2(lora={"rank": 4, "target_modules": ["single_transformer_blocks.1.attn.to_out"]})
    assert [n for n, _ in per_block.transformer.named_parameters() if "lora_A" in n] == [
        "single_transformer_blocks.1.attn.to_out.lora_A.default.weight"]
