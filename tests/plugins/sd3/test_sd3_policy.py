"""SD3Policy's Policy-protocol behaviour on the tiny preset: shapes, noise, schedule, CFG, velocity, decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention import JointTransformerBlock

from flowfactory.types import Policy

PROMPTS = ["a red square", "a blue circle"]


@pytest.fixture
def policy(make_policy):
    return make_policy()


def test_is_a_policy_with_latent_shapes(policy) -> None:
    assert isinstance(policy, Policy)
    assert policy.latent_shape == (4, 32, 32)  # 32x32 pixels, VAE scale 1, 4 latent channels; patch 2 packs
    assert policy.height == policy.width == 32 and policy.max_sequence_length == 16
    assert policy.guidance_scale == 1.0 and not policy.do_cfg
    assert policy.compute_dtype == torch.float32


def test_encode_joins_three_encoders(policy) -> None:
    cond = policy.encode(PROMPTS)
    assert set(cond) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert cond["prompt_embeds"].shape == (2, 16 + 16, 96)  # CLIP tokens (L, G side by side, padded) + T5 tokens
    assert cond["pooled_prompt_embeds"].shape == (2, 64)  # both CLIP projections concatenated
    clip = cond["prompt_embeds"][:, :16]
    assert clip[..., 64:].abs().max() == 0  # CLIP-L + CLIP-G (32 + 32) zero-padded to the T5 width
    assert clip[..., :64].abs().max() > 0 and cond["prompt_embeds"][:, 16:].abs().max() > 0
    alone = policy.encode(PROMPTS[1:])
    for k in cond:
        torch.testing.assert_close(alone[k][0], cond[k][1], atol=1e-6, rtol=0)


def test_cfg_encodes_the_negative_prompt(make_policy, gens) -> None:
    policy = make_policy(guidance_scale=4.5, negative_prompt="grey")
    cond = policy.encode(PROMPTS)
    assert policy.do_cfg and set(cond) == {"prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                                           "negative_pooled_prompt_embeds"}
    torch.testing.assert_close(cond["negative_prompt_embeds"][0], cond["negative_prompt_embeds"][1])
    grey = policy.encode(["grey"])
    torch.testing.assert_close(cond["negative_prompt_embeds"][:1], grey["prompt_embeds"], atol=1e-6, rtol=0)
    x, sigma = policy.noise(gens(2)), torch.tensor(0.5)
    plain = make_policy()
    with torch.no_grad():
        v = policy.velocity(x, sigma, cond)
        cond_pass = plain.velocity(x, sigma, {k: cond[k] for k in ("prompt_embeds", "pooled_prompt_embeds")})
        uncond = plain.velocity(x, sigma, {"prompt_embeds": cond["negative_prompt_embeds"],
                                           "pooled_prompt_embeds": cond["negative_pooled_prompt_embeds"]})
    torch.testing.assert_close(v, uncond + 4.5 * (cond_pass - uncond), atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="negative prompt"):
        policy.velocity(x, sigma, plain.encode(PROMPTS))


def test_noise_matches_pipeline_prepare_latents(policy, gens) -> None:
    z = policy.noise(gens(3))
    assert z.shape == (3, 4, 32, 32) and z.dtype == torch.float32
    expected = policy.pipe.prepare_latents(3, 4, 32, 32, torch.float32, torch.device("cpu"), gens(3))
    torch.testing.assert_close(z, expected, atol=0, rtol=0)
    torch.testing.assert_close(policy.noise(gens(1, offset=2))[0], z[2], atol=0, rtol=0)


def test_sigmas_follow_sd3_static_shift(policy) -> None:
    steps = 6
    s = policy.sigmas(steps)
    assert s.shape == (steps + 1,) and s.dtype == torch.float32
    # the scheduler's linspace over its (shifted) sigma range, mapped back and shifted by 3: 3s / (1 + 2s)
    sched = policy.pipe.scheduler
    t = np.linspace(sched.sigma_max * 1000, sched.sigma_min * 1000, steps) / 1000
    np.testing.assert_allclose(s[:-1].numpy(), 3 * t / (1 + 2 * t), atol=1e-6)
    assert s[0] == 1.0 and s[-1] == 0.0 and bool((s[1:] < s[:-1]).all())
    policy.sigmas(3)
    torch.testing.assert_close(policy.sigmas(steps), s, atol=0, rtol=0)


def test_velocity_shape_and_batch_independence(policy, gens) -> None:
    cond, x = policy.encode(PROMPTS), policy.noise(gens(2))
    with torch.no_grad():
        v = policy.velocity(x, torch.tensor([0.7, 0.7]), cond)
        v_scalar = policy.velocity(x, torch.tensor(0.7), cond)
        v_row = policy.velocity(x[1:], torch.tensor([0.7]), {k: c[1:] for k, c in cond.items()})
    assert v.shape == x.shape and v.dtype == x.dtype
    torch.testing.assert_close(v, v_scalar, atol=0, rtol=0)
    torch.testing.assert_close(v_row[0], v[1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"expected \(4, 32, 32\)"):
        policy.velocity(x[:, :, :8], torch.tensor(0.7), cond)


def test_prompts_and_sigma_change_the_velocity(policy, gens) -> None:
    x = policy.noise(gens(1)).repeat(2, 1, 1, 1)
    cond = policy.encode(PROMPTS)
    with torch.no_grad():
        v = policy.velocity(x, torch.tensor(0.5), cond)
        assert (v[0] - v[1]).abs().max() > 1e-3
        seq, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        for c in ({"prompt_embeds": seq[[0, 0]], "pooled_prompt_embeds": pooled},
                  {"prompt_embeds": seq, "pooled_prompt_embeds": pooled[[0, 0]]}):
            w = policy.velocity(x, torch.tensor(0.5), c)
            assert (w[0] - w[1]).abs().max() > 1e-4
        assert (policy.velocity(x, torch.tensor(0.2), cond) - v).abs().max() > 1e-3


def test_same_seed_same_model_other_seed_other_model(make_policy, gens) -> None:
    a, b, c = make_policy(seed=0), make_policy(seed=0), make_policy(seed=1)
    sa, sb = a.transformer.state_dict(), b.transformer.state_dict()
    assert all(torch.equal(t, sb[n]) for n, t in sa.items())
    cond, x = a.encode(PROMPTS), a.noise(gens(2))
    with torch.no_grad():
        va, vb = a.velocity(x, torch.tensor(0.5), cond), b.velocity(x, torch.tensor(0.5), cond)
        vc = c.velocity(x, torch.tensor(0.5), c.encode(PROMPTS))
    torch.testing.assert_close(va, vb, atol=0, rtol=0)
    assert (va - vc).abs().max() > 1e-2


def test_fsdp_block_classes_are_the_joint_blocks(policy) -> None:
    assert policy.fsdp_block_classes == (JointTransformerBlock,)


def test_decode_matches_pipeline_postprocess(policy, gens) -> None:
    x = policy.noise(gens(2)) * 0.8
    images = policy.decode(x)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.01
    pipe = policy.pipe
    with torch.no_grad():
        raw = pipe.vae.decode(x / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
        expected = pipe.image_processor.postprocess(raw, output_type="pt")
    torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)

