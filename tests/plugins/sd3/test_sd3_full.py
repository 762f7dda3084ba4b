"""Full finetune through the sd3 policy: every live transformer weight trains, the reference is a frozen copy."""

from __future__ import annotations

import json

import torch
from diffusers import SD3Transformer2DModel

PROMPTS = ["a red square", "a blue circle"]


def frozen_parts(policy) -> list[torch.nn.Parameter]:
    pipe = policy.pipe
    return [p for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, policy.vae)
            for p in m.parameters()]


def test_transformer_trains_in_float32_but_dead_modules(make_policy, gens) -> None:
    policy = make_policy()
    trainable = policy.trainable_parameters()
    dead = {n for n, p in policy.transformer.named_parameters() if not p.requires_grad}
    # the last (context-pre-only) block's text query projection and its norm feed nothing
    assert dead == {"transformer_blocks.2.attn.add_q_proj.weight", "transformer_blocks.2.attn.add_q_proj.bias",
                    "transformer_blocks.2.attn.norm_added_q.weight"}
    assert len(trainable) == len(list(policy.transformer.parameters())) - 3
    assert all(p.dtype == torch.float32 and p.requires_grad for p in trainable)
    assert 6e6 < sum(p.numel() for p in trainable) < 8e6
    v = policy.velocity(policy.noise(gens(2)), torch.tensor(0.6), policy.encode(PROMPTS))
    (v**2).mean().backward()
    assert all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in frozen_parts(policy))


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
    loaded = SD3Transformer2DModel.from_pretrained(out / "transformer")
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
    assert "SD3Transformer2DModel.from_pretrained" in (out / "README.md").read_text()
