"""Full finetune through the qwen-image policy: every live transformer weight trains, the reference is a frozen
copy, and the save loads with from_pretrained."""

from __future__ import annotations

import json

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

PROMPTS = ["a red square", "a blue circle"]


def test_transformer_trains_in_float32_but_dead_modules(make_policy, gens) -> None:
    policy = make_policy()
    trainable = policy.trainable_parameters()
    dead = {n for n, p in policy.transformer.named_parameters() if not p.requires_grad}
    # the last block's text-stream output path feeds nothing: the transformer drops the text stream after it
    assert dead == {f"transformer_blocks.1.{m}.{k}" for m in ("attn.add_q_proj", "attn.to_add_out",
                                                              "txt_mlp.net.0.proj", "txt_mlp.net.2")
                    for k in ("weight", "bias")} | {"transformer_blocks.1.attn.norm_added_q.weight"}
    assert all(p.dtype == torch.float32 and p.requires_grad for p in trainable)
    assert 3e6 < sum(p.numel() for p in trainable) < 8e6
    v = policy.velocity(policy.noise(gens(2)), torch.tensor(0.6), policy.encode(PROMPTS))
    (v**2).mean().backward()
    assert all(p.grad is not None for p in trainable)
    assert all(p.grad is None for m in (policy.pipe.text_encoder, policy.vae) for p in m.parameters())


def test_fsdp_block_classes_come_from_no_split_modules(make_policy) -> None:
    policy = make_policy()
    assert policy.fsdp_block_classes == (QwenImageTransformerBlock,)


def test_reference_is_the_frozen_initial_model(make_policy, gens, perturb) -> None:
    policy = make_policy()
    cond, x, sigma = policy.encode(PROMPTS), policy.noise(gens(2)), torch.tensor(0.4)
    with torch.no_grad():
        initial = policy.velocity(x, sigma, cond)
    perturb(policy.trainable_parameters(), seed=5, scale=0.02)
    with torch.no_grad():
        trained = policy.velocity(x, sigma, cond)
    assert (trained - initial).abs().max() > 1e-3
    with policy.reference():
        ref = policy.velocity(x, sigma, cond)
        assert not ref.requires_grad
    torch.testing.assert_close(ref, initial, atol=0, rtol=0)


def test_save_reloads_with_from_pretrained(make_policy, tmp_path, perturb, gens) -> None:
    policy = make_policy()
    perturb(policy.trainable_parameters(), seed=6)
    out = tmp_path / "final"
    policy.save(str(out))
    loaded = QwenImageTransformer2DModel.from_pretrained(out / "transformer")
    ours, theirs = policy.transformer.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    x, cond, sigma = policy.noise(gens(2)), policy.encode(PROMPTS), torch.tensor(0.5)
    with torch.no_grad():
        policy.module = loaded
        from_disk = policy.velocity(x, sigma, cond)
        policy.module = policy.transformer
        torch.testing.assert_close(from_disk, policy.velocity(x, sigma, cond), atol=0, rtol=0)
    assert json.loads((out / "flowfactory.json").read_text())["kind"] == "full"
    assert "QwenImageTransformer2DModel.from_pretrained" in (out / "README.md").read_text()
