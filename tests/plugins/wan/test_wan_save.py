"""Saving Wan 2.2's two experts for diffusers: LoRA files a stock WanPipeline loads with `load_lora_weights`, and
full-finetune transformer folders that `from_pretrained` reads (one expert is in test_wan_diffusers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel

from flowfactory.samplers.flow import ODESampler

PROMPTS = ["a red square", "a blue circle"]
KW = dict(height=16, width=16, num_frames=5, max_sequence_length=16, output_type="pt")


def ours(policy, steps: int, z: torch.Tensor, gens) -> torch.Tensor:
    traj = ODESampler(steps).rollout(policy, policy.encode(PROMPTS), z, gens(2), keep="final", deterministic=True)
    return policy.decode(traj.final)


def test_saved_two_expert_lora_loads_into_a_stock_pipeline(make_policy, tiny2_dir: Path, tmp_path: Path, gens,
                                                           perturb) -> None:
    policy = make_policy(tiny_experts=2, lora={"rank": 4, "alpha": 8.0}, guidance_scale=2.0)
    perturb(policy.trainable_parameters(), seed=3, scale=0.1)
    out = tmp_path / "final"
    policy.save(str(out))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert "load_lora_weights" in (out / "README.md").read_text()
    info = json.loads((out / "flowfactory.json").read_text())
    assert (info["kind"], info["experts"]) == ("lora", 2)

    steps, z = 4, policy.noise(gens(2))
    mine = ours(policy, steps, z, gens)
    stock = WanPipeline.from_pretrained(tiny2_dir)
    untrained = stock(PROMPTS, latents=z.clone(), num_inference_steps=steps, guidance_scale=2.0, **KW).frames
    stock.load_lora_weights(str(out))
    assert (out / "transformer_2" / "pytorch_lora_weights.safetensors").is_file()
    stock.load_lora_weights(str(out / "transformer_2"), load_into_transformer_2=True)
    theirs = stock(PROMPTS, latents=z.clone(), num_inference_steps=steps, guidance_scale=2.0, **KW).frames
    assert (mine - theirs).abs().max() < 1e-4
    assert (mine - untrained).abs().max() > 1e-3  # the adapters changed the video, so the check has teeth


def test_two_expert_full_finetune_saves_transformer_folders(make_policy, tiny2_dir: Path, tmp_path: Path, gens,
                                                            perturb) -> None:
    policy = make_policy(tiny_experts=2)
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    perturb(policy.trainable_parameters(), seed=4, scale=0.02)
    out = tmp_path / "final"
    policy.save(str(out))
    assert json.loads((out / "flowfactory.json").read_text())["kind"] == "full"
    parts = {name: WanTransformer3DModel.from_pretrained(out / name) for name in ("transformer", "transformer_2")}
    stock = WanPipeline.from_pretrained(tiny2_dir, **parts)
    steps, z = 4, policy.noise(gens(2))
    theirs = stock(PROMPTS, latents=z.clone(), num_inference_steps=steps, guidance_scale=1.0, **KW).frames
    assert (ours(policy, steps, z, gens) - theirs).abs().max() < 1e-4
    with policy.reference():  # the frozen copies are the pre-training experts
        ref = ours(policy, steps, z, gens)
    base = WanPipeline.from_pretrained(tiny2_dir)
    untrained = base(PROMPTS, latents=z.clone(), num_inference_steps=steps, guidance_scale=1.0, **KW).frames
    assert (ref - untrained).abs().max() < 1e-4
    assert (theirs - untrained).abs().max() > 1e-4


def test_lora_targets_default_to_wan_attention(make_policy) -> None:
    from flowfactory.errors import FlowFactoryError

    policy = make_policy(lora={"rank": 2})
    names = [n for n, _ in policy.module.named_parameters() if "lora_A" in n]
    assert names and all(any(f".{t}." in n for t in ("to_q", "to_k", "to_v", "to_out.0")) for n in names)
    with pytest.raises(FlowFactoryError, match="match no module"):
        make_policy(lora={"rank": 2, "target_modules": ["add_q_proj"]})


def test_gradient_checkpointing_gives_the_same_gradients(make_policy, gens, perturb) -> None:
    grads = []
    for ckpt in (False, True):
        policy = make_policy(tiny_experts=2, lora={"rank": 4}, gradient_checkpointing=ckpt)
        assert policy.pipe.transformer_2.gradient_checkpointing is ckpt
        perturb(policy.trainable_parameters(), seed=5)
        x, cond = policy.noise(gens(2)), policy.encode(PROMPTS)
        for s in (0.95, 0.3):
            (policy.velocity(x, torch.tensor(s), cond) ** 2).mean().backward()
        grads.append([p.grad.clone() for p in policy.trainable_parameters()])
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g1, g0, atol=1e-6, rtol=1e-5)
