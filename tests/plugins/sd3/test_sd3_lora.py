"""LoRA training through the sd3 policy: what gets gradients, the reference view, and saving for diffusers."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from flowfactory.samplers.flow import ODESampler

PROMPTS = ["a red square", "a blue circle"]
LORA = {"rank": 4, "alpha": 8.0}


def velocity_loss(policy, x, cond) -> torch.Tensor:
    return (policy.velocity(x, torch.tensor(0.6), cond) ** 2).mean()


def lora_params(policy, which: str) -> list[torch.nn.Parameter]:
    return [p for n, p in policy.transformer.named_parameters() if f"lora_{which}" in n]


def test_trainable_parameters_are_the_adapters(make_policy) -> None:
    policy = make_policy(lora=LORA)
    named = {id(p): n for n, p in policy.transformer.named_parameters()}
    trainable = policy.trainable_parameters()
    # 2 joint blocks x 8 projections + the context-pre-only last block's 6 (no to_add_out, no dead add_q_proj),
    # plus block 0's dual attention (attn2: to_q, to_k, to_v, to_out.0); an A and a B each
    assert len(trainable) == 2 * (2 * 8 + 6 + 4)
    assert not any("transformer_blocks.2.attn.add_q_proj" in named[id(p)] for p in trainable)
    assert all("lora_" in named[id(p)] and p.dtype == torch.float32 for p in trainable)
    assert sum(p.numel() for p in trainable) < 0.05 * sum(p.numel() for p in policy.transformer.parameters())


def test_gradient_reaches_lora_and_only_lora(make_policy, gens, perturb) -> None:
    policy = make_policy(lora=LORA)
    cond, x = policy.encode(PROMPTS), policy.noise(gens(2))
    velocity_loss(policy, x, cond).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params(policy, "B"))
    perturb(lora_params(policy, "B"), seed=1)
    for p in policy.trainable_parameters():
        p.grad = None
    velocity_loss(policy, x, cond).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())
    base = [n for n, p in policy.transformer.named_parameters() if "lora_" not in n and p.grad is not None]
    pipe = policy.pipe
    frozen = [p for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, policy.vae)
              for p in m.parameters()]
    assert base == [] and all(p.grad is None for p in frozen)


def test_reference_is_the_unadapted_model(make_policy, gens, perturb) -> None:
    policy, plain = make_policy(lora=LORA), make_policy()  # same seed: same base weights, no adapter
    cond, x, sigma = policy.encode(PROMPTS), policy.noise(gens(2)), torch.tensor(0.6)
    with torch.no_grad():
        base = plain.velocity(x, sigma, cond)
        torch.testing.assert_close(policy.velocity(x, sigma, cond), base, atol=1e-6, rtol=0)
    perturb(policy.trainable_parameters(), seed=2)
    with torch.no_grad():
        adapted = policy.velocity(x, sigma, cond)
    assert (adapted - base).abs().max() > 1e-3
    with policy.reference():
        ref = policy.velocity(x, sigma, cond)
        assert not ref.requires_grad
    torch.testing.assert_close(ref, base, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(policy.velocity(x, sigma, cond), adapted, atol=0, rtol=0)
    assert all(p.requires_grad for p in policy.trainable_parameters())


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_saved_lora_loads_into_a_stock_pipeline(make_policy, tiny_dir, tmp_path, gens, perturb,
                                                guidance_scale: float) -> None:
    policy = make_policy(lora=LORA, guidance_scale=guidance_scale)
    perturb(policy.trainable_parameters(), seed=3, scale=0.1)
    out = tmp_path / "final"
    policy.save(str(out))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert "load_lora_weights" in (out / "README.md").read_text()
    assert json.loads((out / "flowfactory.json").read_text())["kind"] == "lora"

    steps, z = 3, policy.noise(gens(2))
    traj = ODESampler(steps).rollout(policy, policy.encode(PROMPTS), z, gens(2), keep="final", deterministic=True)
    ours = policy.decode(traj.final)

    stock = StableDiffusion3Pipeline.from_pretrained(tiny_dir)
    kwargs = dict(height=32, width=32, num_inference_steps=steps, max_sequence_length=16, output_type="pt",
                  guidance_scale=guidance_scale)
    untrained = stock(PROMPTS, latents=z.clone(), **kwargs).images
    stock.load_lora_weights(str(out))
    theirs = stock(PROMPTS, latents=z.clone(), **kwargs).images
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - untrained).abs().max() > 1e-3  # the adapter changed the image, so the check has teeth


def test_adapter_init_is_deterministic_from_the_seed(make_policy) -> None:
    a, b, c = make_policy(lora=LORA), make_policy(lora=LORA), make_policy(seed=1, lora=LORA)
    for pa, pb, pc in zip(*(lora_params(p, "A") for p in (a, b, c)), strict=True):
        assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_gradient_checkpointing_gives_the_same_gradients(make_policy, gens, perturb) -> None:
    grads = []
    for ckpt in (False, True):
        policy = make_policy(lora=LORA, gradient_checkpointing=ckpt)
        assert policy.transformer.gradient_checkpointing is ckpt
        perturb(policy.trainable_parameters(), seed=4)
        velocity_loss(policy, policy.noise(gens(2)), policy.encode(PROMPTS)).backward()
        grads.append([p.grad.clone() for p in policy.trainable_parameters()])
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g1, g0, atol=1e-6, rtol=1e-5)


def test_low_precision_base_keeps_float32_adapters(make_policy, gens) -> None:
    policy = make_policy(lora=LORA, dtype="bfloat16")
    assert policy.compute_dtype == torch.bfloat16 and policy.pipe.text_encoder_3.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    x = policy.noise(gens(2))
    assert x.dtype == torch.bfloat16
    v = policy.velocity(x, torch.tensor(0.5), policy.encode(PROMPTS))
    assert v.shape == x.shape and v.dtype == torch.bfloat16 and torch.isfinite(v).all()
    v.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params(policy, "B"))


def test_flow_sde_log_probs_recompute_with_grad(make_policy, gens, perturb) -> None:
    """GRPO's ratio starts at 1: the log-prob recomputed with grad equals the rollout's, step by step (CFG on)."""
    from flowfactory.plugins import load
    from flowfactory.registry import BuildContext

    policy = make_policy(lora=LORA, guidance_scale=3.0)
    perturb(policy.trainable_parameters(), seed=7)
    sampler = load(strict=True).registry.get("sampler", "flow-sde").create({"steps": 4}, BuildContext(seed=0))
    cond = policy.encode(PROMPTS)
    traj = sampler.rollout(policy, cond, policy.noise(gens(2)), gens(2, offset=10))
    assert traj.latents is not None and traj.latents.shape == (2, 5, 4, 32, 32)
    for step in traj.stochastic_steps():
        dist = sampler.log_prob(policy, traj, step, cond)
        torch.testing.assert_close(dist.log_prob.detach(), traj.log_probs[:, step], atol=1e-4, rtol=0)
        assert dist.log_prob.requires_grad
