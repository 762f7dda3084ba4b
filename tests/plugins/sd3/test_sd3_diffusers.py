"""flowfactory's diffusers suite on the sd3 policy: options, parity with StableDiffusion3Pipeline (with CFG),
LoRA and full-finetune saves that stock diffusers loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from flowfactory_diffusers.testing import COMMON_BAD_OPTIONS, DiffusersPolicyContract
from flowfactory_sd3.tiny import build_tiny_pipeline


def call_kwargs(policy: Any) -> dict[str, Any]:
    return dict(height=32, width=32, max_sequence_length=16, guidance_scale=policy.guidance_scale,
                negative_prompt=policy.negative_prompt)


class TestSD3Diffusers(DiffusersPolicyContract):
    component = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    transformer_class = SD3Transformer2DModel
    tiny_builder = staticmethod(build_tiny_pipeline)
    call_kwargs = staticmethod(call_kwargs)
    model_options = {"height": 32, "max_sequence_length": 16, "guidance_scale": 1.0}  # width defaults to height
    cfg_options = {"guidance_scale": 4.5, "negative_prompt": "a green tree"}
    bad_options = (*COMMON_BAD_OPTIONS, ({"preset": "tiny", "max_sequence_length": 513}, "max_sequence_length"))
    readme = Path(__file__).resolve().parents[3] / "plugins" / "flowfactory-sd3" / "README.md"


# --- what is SD3's own --------------------------------------------------------------------------------------

def test_full_finetune_skips_the_dead_modules(make_policy) -> None:
    policy = make_policy()
    trainable = policy.trainable_parameters()
    dead = {n for n, p in policy.transformer.named_parameters() if not p.requires_grad}
    # the last (context-pre-only) block's text query projection and its norm feed nothing
    assert dead == {"transformer_blocks.2.attn.add_q_proj.weight", "transformer_blocks.2.attn.add_q_proj.bias",
                    "transformer_blocks.2.attn.norm_added_q.weight"}
    assert len(trainable) == len(list(policy.transformer.parameters())) - 3
    assert 6e6 < sum(p.numel() for p in trainable) < 8e6


def test_lora_adapts_every_live_projection(make_policy) -> None:
    policy = make_policy(lora={"rank": 4, "alpha": 8.0})
    named = {id(p): n for n, p in policy.transformer.named_parameters()}
    trainable = policy.trainable_parameters()
    # 2 joint blocks x 8 projections + the context-pre-only last block's 6 (no to_add_out, no dead add_q_proj),
    # plus block 0's dual attention (attn2: to_q, to_k, to_v, to_out.0); an A and a B each
    assert len(trainable) == 2 * (2 * 8 + 6 + 4)
    assert not any("transformer_blocks.2.attn.add_q_proj" in named[id(p)] for p in trainable)
