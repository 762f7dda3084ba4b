"""FluxPolicy's Policy-protocol behaviour on the tiny preset: shapes, noise, schedule, velocity, decode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

from flowfactory.types import Policy

PROMPTS = ["a red square", "a blue circle"]


@pytest.fixture
def policy(make_policy):
    return make_policy()


def test_is_a_policy_with_packed_shapes(policy) -> None:
    assert isinstance(policy, Policy)
    # 32x32 pixels, VAE scale 1, 4 latent channels -> 16x16 patches of 2x2x4
    assert policy.latent_shape == (256, 16)
    assert policy.height == policy.width == 32 and policy.max_sequence_length == 32
    assert policy.compute_dtype == torch.float32


def test_encode_shapes(policy) -> None:
    cond = policy.encode(PROMPTS)
    assert set(cond) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert cond["prompt_embeds"].shape == (2, 32, 64)  # max_sequence_length x T5 d_model
    assert cond["pooled_prompt_embeds"].shape == (2, 64)  # CLIP hidden size
    assert not cond["prompt_embeds"].requires_grad
    # rows are per prompt: encoding one prompt alone gives its row
    alone = policy.encode(PROMPTS[1:])
    torch.testing.assert_close(alone["prompt_embeds"][0], cond["prompt_embeds"][1], atol=1e-6, rtol=0)
    torch.testing.assert_close(alone["pooled_prompt_embeds"][0], cond["pooled_prompt_embeds"][1], atol=1e-6, rtol=0)


def test_noise_matches_pipeline_prepare_latents(policy, gens) -> None:
    z = policy.noise(gens(3))
    assert z.shape == (3, 256, 16) and z.dtype == torch.float32
    expected, _ = policy.pipe.prepare_latents(3, 4, 32, 32, torch.float32, torch.device("cpu"), gens(3))
    torch.testing.assert_close(z, expected, atol=0, rtol=0)
    # a row depends only on its generator
    torch.testing.assert_close(policy.noise(gens(1, offset=2))[0], z[2], atol=0, rtol=0)


def test_sigmas_follow_flux_dynamic_shift(policy) -> None:
    steps = 6
    s = policy.sigmas(steps)
    assert s.shape == (steps + 1,) and s.dtype == torch.float32 and s.device.type == "cpu"
    # mu = calculate_shift(256 tokens) = base_shift 0.5; exponential time shift e^mu / (e^mu + 1/t - 1)
    t = np.linspace(1.0, 1.0 / steps, steps)
    expected = math.exp(0.5) / (math.exp(0.5) + (1.0 / t - 1.0))
    np.testing.assert_allclose(s[:-1].numpy(), expected, atol=1e-6)
    assert s[0] == 1.0 and s[-1] == 0.0 and bool((s[1:] < s[:-1]).all())
    policy.sigmas(3)  # another length must not disturb a cached one
    torch.testing.assert_close(policy.sigmas(steps), s, atol=0, rtol=0)


def test_velocity_shape_and_batch_independence(policy, gens) -> None:
    cond = policy.encode(PROMPTS)
    x = policy.noise(gens(2))
    with torch.no_grad():
        v = policy.velocity(x, torch.tensor([0.7, 0.7]), cond)
        v_scalar = policy.velocity(x, torch.tensor(0.7), cond)
        v_row = policy.velocity(x[1:], torch.tensor([0.7]), {k: c[1:] for k, c in cond.items()})
    assert v.shape == x.shape and v.dtype == x.dtype
    torch.testing.assert_close(v, v_scalar, atol=0, rtol=0)
    torch.testing.assert_close(v_row[0], v[1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"expected \(256, 16\)"):
        policy.velocity(x[:, :10], torch.tensor(0.7), cond)


def test_prompts_and_sigma_change_the_velocity(policy, gens) -> None:
    x = policy.noise(gens(1)).repeat(2, 1, 1)
    cond = policy.encode(PROMPTS)
    with torch.no_grad():
        v = policy.velocity(x, torch.tensor(0.5), cond)
        assert (v[0] - v[1]).abs().max() > 1e-3
        # each text stream matters on its own: swap only the pooled CLIP vector, then only the T5 sequence
        t5, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        pooled_only = {"prompt_embeds": t5[[0, 0]], "pooled_prompt_embeds": pooled}
        t5_only = {"prompt_embeds": t5, "pooled_prompt_embeds": pooled[[0, 0]]}
        for c in (pooled_only, t5_only):
            w = policy.velocity(x, torch.tensor(0.5), c)
            assert (w[0] - w[1]).abs().max() > 1e-4
        other_sigma = policy.velocity(x, torch.tensor(0.2), cond)
        assert (other_sigma - v).abs().max() > 1e-3


def test_same_seed_same_model_other_seed_other_model(make_policy, gens) -> None:
    a, b, c = make_policy(seed=0), make_policy(seed=0), make_policy(seed=1)
    sa, sb = a.transformer.state_dict(), b.transformer.state_dict()
    assert sa.keys() == sb.keys()
    for name, tensor in sa.items():
        assert torch.equal(tensor, sb[name]), name
    cond = a.encode(PROMPTS)
    torch.testing.assert_close(cond, b.encode(PROMPTS), atol=0, rtol=0)
    x = a.noise(gens(2))
    with torch.no_grad():
        va, vb = a.velocity(x, torch.tensor(0.5), cond), b.velocity(x, torch.tensor(0.5), cond)
        vc = c.velocity(x, torch.tensor(0.5), c.encode(PROMPTS))
    torch.testing.assert_close(va, vb, atol=0, rtol=0)
    assert (va - vc).abs().max() > 1e-2


def test_velocity_goes_through_a_replaced_module(policy, gens) -> None:
    """The loop may swap `module` for its Accelerate wrapper; velocity must call that wrapper."""

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, **kwargs):
            self.calls += 1
            return self.inner(**kwargs)

    cond, x = policy.encode(PROMPTS), policy.noise(gens(2))
    with torch.no_grad():
        before = policy.velocity(x, torch.tensor(0.5), cond)
        policy.module = Wrapper(policy.transformer)
        after = policy.velocity(x, torch.tensor(0.5), cond)
    assert policy.module.calls == 1
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_fsdp_block_classes_are_both_block_kinds(policy) -> None:
    assert policy.fsdp_block_classes == (FluxTransformerBlock, FluxSingleTransformerBlock)


def test_decode_matches_pipeline_postprocess(policy, gens) -> None:
    x = policy.noise(gens(2)) * 0.8
    images = policy.decode(x)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.01
    pipe = policy.pipe
    with torch.no_grad():
        latents = pipe._unpack_latents(x, 32, 32, pipe.vae_scale_factor)
        raw = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
        expected = pipe.image_processor.postprocess(raw, output_type="pt")
    torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)

