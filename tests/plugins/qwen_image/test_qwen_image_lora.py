"""LoRA training through the qwen-image policy: what gets gradients, the reference view, and saving for diffusers."""

from __future__ import annotations

import json

import pytest
import torch

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
    # block 0: 8 projections; the last block: 6 (its text queries and to_add_out feed the discarded text stream);
    # an A and a B each
    assert len(trainable) == 2 * (8 + 6)
    assert not any(f"transformer_blocks.1.attn.{m}" in named[id(p)] for p in trainable
                   for m in ("add_q_proj", "to_add_out"))
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
    frozen = [p for m in (policy.pipe.text_encoder, policy.vae) for p in m.parameters()]
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


@pytest.mark.parametrize("true_cfg_scale", [1.0, 4.0])
def test_saved_lora_loads_into_a_stock_pipeline(make_policy, tiny_dir, stock, tmp_path, gens, perturb,
                                                true_cfg_scale: float) -> None:
    policy = make_policy(lora=LORA, true_cfg_scale=true_cfg_scale)
    perturb(policy.trainable_parameters(), seed=3, scale=0.1)
    out = tmp_path / "final"
    policy.save(str(out))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert "load_lora_weights" in (out / "README.md").read_text()
    assert json.loads((out / "flowfactory.json").read_text())["kind"] == "lora"

    steps, z = 3, policy.noise(gens(2))
    cond = policy.encode(PROMPTS)
    traj = ODESampler(steps).rollout(policy, cond, z, gens(2), keep="final", deterministic=True)
    ours = policy.decode(traj.final)

    pipe = stock(tiny_dir, policy)
    kwargs = dict(height=32, width=32, num_inference_steps=steps, max_sequence_length=32, output_type="pt",
                  true_cfg_scale=true_cfg_scale, negative_prompt=" " if true_cfg_scale > 1 else None)
    untrained = pipe(PROMPTS, latents=z.clone(), **kwargs).images
    pipe.load_lora_weights(str(out))
    theirs = pipe(PROMPTS, latents=z.clone(), **kwargs).images
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - untrained).abs().max() > 1e-3  # the adapter changed the image, so the check has teeth
    # the same velocity from the stock pipeline's adapted transformer
    x, sigma = policy.noise(gens(2, offset=5)), torch.tensor(0.5)
    with torch.no_grad():
        policy.module = pipe.transformer
        stock_v = policy.velocity(x, sigma, cond)
        policy.module = policy.transformer
        torch.testing.assert_close(stock_v, policy.velocity(x, sigma, cond), atol=1e-5, rtol=0)


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
    assert policy.compute_dtype == torch.bfloat16 and policy.pipe.text_encoder.dtype == torch.bfloat16
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

    policy = make_policy(lora=LORA, true_cfg_scale=4.0)
    perturb(policy.trainable_parameters(), seed=7)
    sampler = load(strict=True).registry.get("sampler", "flow-sde").create({"steps": 3}, BuildContext(seed=0))
    cond = policy.encode(PROMPTS)
    traj = sampler.rollout(policy, cond, policy.noise(gens(2)), gens(2, offset=10))
    assert traj.latents is not None and traj.latents.shape == (2, 4, 256, 16)
    for step in traj.stochastic_steps():
        dist = sampler.log_prob(policy, traj, step, cond)
        torch.testing.assert_close(dist.log_prob.detach(), traj.log_probs[:, step], atol=1e-4, rtol=0)
        assert dist.log_prob.requires_grad
