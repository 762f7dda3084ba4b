"""Full finetune through the flux policy: every transformer weight trains, the reference is a frozen copy."""

from __future__ import annotations

import json

import torch
from diffusers import FluxTransformer2DModel

PROMPTS = ["a red square", "a blue circle"]


def test_whole_transformer_trains_in_float32(make_policy, gens) -> None:
    policy = make_policy()
    trainable = policy.trainable_parameters()
    assert len(trainable) == len(list(policy.transformer.parameters()))
    assert all(p.dtype == torch.float32 and p.requires_grad for p in trainable)
    assert 6e6 < sum(p.numel() for p in trainable) < 8e6  # the ~7M transformer the quickstart needs to learn
    v = policy.velocity(policy.noise(gens(2)), torch.tensor(0.6), policy.encode(PROMPTS))
    (v**2).mean().backward()
    assert all(p.grad is not None for p in trainable)
    assert sum(float(p.grad.abs().sum()) > 0 for p in trainable) > 0.95 * len(trainable)
    frozen = [p for m in (policy.pipe.text_encoder, policy.pipe.text_encoder_2, policy.vae) for p in m.parameters()]
    assert all(p.grad is None for p in frozen)


def test_reference_is_the_frozen_initial_model(make_policy, gens, perturb) -> None:
    policy = make_policy()
    cond, x, sigma = policy.encode(PROMPTS), policy.noise(gens(2)), torch.tensor(0.4)
    with torch.no_grad():
        initial = policy.velocity(x, sigma, cond)
    with policy.reference():
        torch.testing.assert_close(policy.velocity(x, sigma, cond), initial, atol=0, rtol=0)
    perturb(policy.trainable_parameters(), seed=5, scale=0.02)
    with torch.no_grad():
        trained = policy.velocity(x, sigma, cond)
    assert (trained - initial).abs().max() > 1e-3
    with policy.reference():
        ref = policy.velocity(x, sigma, cond)
        assert not ref.requires_grad
    torch.testing.assert_close(ref, initial, atol=0, rtol=0)
    assert all(p.requires_grad for p in policy.trainable_parameters())


def test_save_reloads_with_from_pretrained(make_policy, tmp_path, perturb) -> None:
    policy = make_policy()
    perturb(policy.trainable_parameters(), seed=6)
    out = tmp_path / "final"
    policy.save(str(out))
    loaded = FluxTransformer2DModel.from_pretrained(out / "transformer")
    ours = policy.transformer.state_dict()
    theirs = loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    assert json.loads((out / "flowfactory.json").read_text())["kind"] == "full"
    assert "FluxTransformer2DModel.from_pretrained" in (out / "README.md").read_text()
