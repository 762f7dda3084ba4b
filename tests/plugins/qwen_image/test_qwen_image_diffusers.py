"""flowfactory's diffusers suite on the qwen-image policy: options, parity with QwenImagePipeline (with true CFG),
LoRA and full-finetune saves that stock diffusers loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

from flowfactory.registry import Registry
from flowfactory.testing import override_contract
from flowfactory_diffusers.testing import COMMON_BAD_OPTIONS, DiffusersPolicyContract
from flowfactory_qwen_image.tiny import build_tiny_pipeline


def call_kwargs(policy: Any) -> dict[str, Any]:
    return dict(height=32, width=32, max_sequence_length=32, true_cfg_scale=policy.true_cfg_scale,
                negative_prompt=policy.negative_prompt)


class TestQwenImageDiffusers(DiffusersPolicyContract):
    component = "qwen-image"
    pipeline_class = QwenImagePipeline
    transformer_class = QwenImageTransformer2DModel
    tiny_builder = staticmethod(build_tiny_pipeline)
    call_kwargs = staticmethod(call_kwargs)
    model_options = {"height": 32, "max_sequence_length": 32, "true_cfg_scale": 1.0}  # width defaults to height
    cfg_options = {"true_cfg_scale": 4.0, "negative_prompt": "a green tree"}
    parity_steps = (2, 4)  # one step is not a schedule for Qwen-Image's stretched sigmas
    bad_options = (*COMMON_BAD_OPTIONS,
                   ({"preset": "tiny", "guidance_scale": 4.0}, "guidance_scale"),  # Qwen-Image's is true_cfg_scale
                   ({"preset": "tiny", "max_sequence_length": 1025}, "max_sequence_length"),
                   ({"preset": "tiny", "true_cfg_scale": -1.0}, "true_cfg_scale"))
    readme = Path(__file__).resolve().parents[3] / "plugins" / "flowfactory-qwen-image" / "README.md"

    def stock_pipeline(self, folder: Path, policy: Any) -> Any:
        """With the prompt-prefix length the policy counted (the stock pipeline hard-codes 34, the real Qwen
        tokenizer's)."""
        pipe = super().stock_pipeline(folder, policy)
        pipe.prompt_template_encode_start_idx = policy.pipe.prompt_template_encode_start_idx
        return pipe

    @override_contract("extends the check: the error also names QwenImagePipeline")
    def test_exactly_one_of_model_and_preset(self, registry: Registry) -> None:
        super().test_exactly_one_of_model_and_preset(registry)
        assert "QwenImagePipeline" in self._error_text(registry, {})


# --- what is Qwen-Image's own -------------------------------------------------------------------------------

def test_full_finetune_skips_the_dead_modules(make_policy) -> None:
    policy = make_policy()
    dead = {n for n, p in policy.transformer.named_parameters() if not p.requires_grad}
    # the last block's text-stream output path feeds nothing: the transformer drops the text stream after it
    assert dead == {f"transformer_blocks.1.{m}.{k}" for m in ("attn.add_q_proj", "attn.to_add_out",
                                                              "txt_mlp.net.0.proj", "txt_mlp.net.2")
                    for k in ("weight", "bias")} | {"transformer_blocks.1.attn.norm_added_q.weight"}
    assert 3e6 < sum(p.numel() for p in policy.trainable_parameters()) < 8e6
    assert policy.fsdp_block_classes == (QwenImageTransformerBlock,)


def test_lora_adapts_every_live_projection(make_policy) -> None:
    policy = make_policy(lora={"rank": 4, "alpha": 8.0})
    named = {id(p): n for n, p in policy.transformer.named_parameters()}
    trainable = policy.trainable_parameters()
    # block 0: 8 projections; the last block: 6 (its text queries and to_add_out feed the discarded text stream);
    # an A and a B each
    assert len(trainable) == 2 * (8 + 6)
    assert not any(f"transformer_blocks.1.attn.{m}" in named[id(p)] for p in trainable
                   for m in ("add_q_proj", "to_add_out"))
