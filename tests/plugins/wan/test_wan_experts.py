"""Wan 2.2 A14B's two experts: the one acting at a sigma (timestep >= boundary_ratio x 1000: the first) is the
one whose velocity is used and the one that is trained."""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["a red square", "a blue circle"]


def calls(policy, sigma: torch.Tensor, x, cond) -> list[str]:
    """Which experts ran during one velocity call, in order."""
    ran: list[str] = []
    hooks = [m.register_forward_hook(lambda *_, n=name: ran.append(n))
             for name, m in (("transformer", policy.pipe.transformer), ("transformer_2", policy.pipe.transformer_2))]
    try:
        with torch.no_grad():
            policy.velocity(x, sigma, cond)
    finally:
        for h in hooks:
            h.remove()
    return ran


@pytest.mark.parametrize("lora", [None, {"rank": 4}])
def test_expert_at_each_sigma(make_policy, gens, lora) -> None:
    policy = make_policy(tiny_experts=2, lora=lora)
    assert policy.boundary_ratio == 0.875
    assert set(policy.module.experts()) == {policy.pipe.transformer, policy.pipe.transformer_2}
    cond, x = policy.encode(PROMPTS), policy.noise(gens(2))
    for sigma in policy.sigmas(6)[:-1].tolist() + [0.875, 0.87499]:
        want = "transformer" if sigma * 1000 >= 875 else "transformer_2"
        assert calls(policy, torch.tensor(sigma), x, cond) == [want], f"sigma {sigma}"
    # rows on both sides of the boundary: each row gets its own expert, as if alone
    mixed = torch.tensor([0.95, 0.5])
    assert sorted(calls(policy, mixed, x, cond)) == ["transformer", "transformer_2"]
    with torch.no_grad():
        v = policy.velocity(x, mixed, cond)
        for i in range(2):
            alone = policy.velocity(x[i:i + 1], mixed[i:i + 1], {k: t[i:i + 1] for k, t in cond.items()})
            torch.testing.assert_close(v[i:i + 1], alone, atol=1e-6, rtol=0)


@pytest.mark.parametrize("lora", [None, {"rank": 4}])
def test_gradients_reach_only_the_acting_expert(make_policy, gens, perturb, lora) -> None:
    policy = make_policy(tiny_experts=2, lora=lora)
    if lora is not None:  # B starts at zero, which zeroes A's gradient: move off the initialisation
        perturb(policy.trainable_parameters(), seed=1)
    cond, x = policy.encode(PROMPTS), policy.noise(gens(2))
    ids = {name: {id(p) for p in m.parameters()} for name, m in
           (("transformer", policy.pipe.transformer), ("transformer_2", policy.pipe.transformer_2))}
    params = policy.trainable_parameters()
    assert all(any(id(p) in s for p in params) for s in ids.values()), "both experts must be trainable"
    for sigma, acting in ((0.95, "transformer"), (0.3, "transformer_2")):
        for p in params:
            p.grad = None
        (policy.velocity(x, torch.tensor(sigma), cond) ** 2).mean().backward()
        got = {name for name, s in ids.items() for p in params if id(p) in s and p.grad is not None}
        assert got == {acting}, f"sigma {sigma}: gradients reached {got}"
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in params if id(p) in ids[acting])


def test_reference_covers_both_experts(make_policy, gens, perturb) -> None:
    policy = make_policy(tiny_experts=2, lora={"rank": 4})
    cond, x = policy.encode(PROMPTS), policy.noise(gens(2))
    with torch.no_grad():
        before = [policy.velocity(x, torch.tensor(s), cond) for s in (0.95, 0.3)]
    perturb(policy.trainable_parameters(), seed=2)
    with policy.reference():
        for s, b in zip((0.95, 0.3), before, strict=True):
            torch.testing.assert_close(policy.velocity(x, torch.tensor(s), cond), b, atol=1e-6, rtol=0)
    with torch.no_grad():
        for s, b in zip((0.95, 0.3), before, strict=True):
            assert (policy.velocity(x, torch.tensor(s), cond) - b).abs().max() > 1e-4


def test_boundary_ratio_option(make_policy) -> None:
    from flowfactory.errors import FlowFactoryError

    policy = make_policy(tiny_experts=2, boundary_ratio=0.5)
    assert policy.expert_index(torch.tensor([0.6, 0.5, 0.4])).tolist() == [0, 0, 1]
    with pytest.raises(FlowFactoryError, match="single expert"):
        make_policy(boundary_ratio=0.5)


def test_flow_sde_log_probs_recompute_with_grad_across_the_boundary(make_policy, gens, perturb) -> None:
    """GRPO's ratio starts at 1: at every stochastic step, on either expert, the log-prob recomputed with grad
    equals the rollout's (CFG on)."""
    from flowfactory.plugins import load
    from flowfactory.registry import BuildContext

    policy = make_policy(tiny_experts=2, lora={"rank": 4}, guidance_scale=3.0)
    perturb(policy.trainable_parameters(), seed=7)
    sampler = load(strict=True).registry.get("sampler", "flow-sde").create({"steps": 4}, BuildContext(seed=0))
    cond = policy.encode(PROMPTS)
    traj = sampler.rollout(policy, cond, policy.noise(gens(2)), gens(2, offset=10))
    assert traj.latents is not None and traj.latents.shape == (2, 5, 4, 3, 8, 8)
    steps = traj.stochastic_steps()
    assert set(policy.expert_index(traj.sigmas[steps]).tolist()) == {0, 1}, "both experts act at stochastic steps"
    for step in steps:
        dist = sampler.log_prob(policy, traj, step, cond)
        torch.testing.assert_close(dist.log_prob.detach(), traj.log_probs[:, step], atol=1e-4, rtol=0)
        assert dist.log_prob.requires_grad


def test_unipc_flow_schedule_of_the_released_pipelines(make_policy, tiny_dir, tmp_path) -> None:
    """The Wan-AI diffusers repos ship UniPCMultistepScheduler with flow sigmas: the policy takes its schedule
    (shifted, ending at 0) and `shift` sets its flow_shift."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_dir)
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                             num_train_timesteps=1000, flow_shift=3.0)
    pipe.save_pretrained(tmp_path / "unipc")
    policy = make_policy(model=str(tmp_path / "unipc"), dtype="float32", height=16, width=16, num_frames=5,
                         max_sequence_length=16, guidance_scale=1.0)
    s = policy.sigmas(10)
    assert s.shape == (11,) and float(s[0]) > 0.99 and float(s[-1]) == 0.0 and bool((s[1:] < s[:-1]).all())
    t = torch.linspace(1, 0, 11)[:-1]
    torch.testing.assert_close(s[:-1], 3.0 * t / (1 + 2.0 * t), atol=2e-3, rtol=0)
    shifted = make_policy(model=str(tmp_path / "unipc"), dtype="float32", height=16, width=16, num_frames=5,
                          max_sequence_length=16, guidance_scale=1.0, shift=5.0).sigmas(10)
    assert float(shifted[5]) > float(s[5])
