"""flowfactory's diffusers suite on the flux policy: options, parity with FluxPipeline, LoRA and full-finetune
saves that stock diffusers loads."""

from __future__ import annotations

from pathlib import Path

from diffusers import FluxPipeline, FluxTransformer2DModel

from flowfactory_diffusers.testing import COMMON_BAD_OPTIONS, DiffusersPolicyContract
from flowfactory_flux.tiny import build_tiny_pipeline


class TestFluxDiffusers(DiffusersPolicyContract):
    component = "flux"
    pipeline_class = FluxPipeline
    transformer_class = FluxTransformer2DModel
    tiny_builder = staticmethod(build_tiny_pipeline)
    call_kwargs = {"height": 32, "width": 32, "max_sequence_length": 32}
    model_options = call_kwargs
    bad_options = (*COMMON_BAD_OPTIONS, ({"preset": "tiny", "max_sequence_length": 513}, "max_sequence_length"))
    readme = Path(__file__).resolve().parents[3] / "plugins" / "flowfactory-flux" / "README.md"


# --- what is Flux's own -------------------------------------------------------------------------------------

def test_full_finetune_trains_the_whole_transformer(make_policy) -> None:
    policy = make_policy()
    trainable = policy.trainable_parameters()
    assert len(trainable) == len(list(policy.transformer.parameters()))  # no dead modules
    assert 6e6 < sum(p.numel() for p in trainable) < 8e6  # the ~7M transformer the quickstart needs to learn


def test_lora_adapts_every_projection(make_policy) -> None:
    trainable = make_policy(lora={"rank": 4, "alpha": 8.0}).trainable_parameters()
    # 2 double blocks x 8 projections (both streams) + 2 single blocks x 3 (q, k, v), an A and a B each
    assert len(trainable) == 2 * (2 * 8 + 2 * 3)
