"""FluxPolicy.encode_image, the inverse of decode that dataset algorithms (sft, offline dpo) use: decoding its
latents equals the VAE's own encode-mean-decode round trip computed here, and images of another size are fitted
(shorter side scaled, centre crop) first."""

from __future__ import annotations

import torch

from flowfactory.prompts import fit_image


def test_decode_of_encode_image_is_the_vaes_round_trip(make_policy) -> None:
    policy = make_policy(height=16, width=16)
    images = [torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    latents = policy.encode_image(images)
    assert tuple(latents.shape) == (3, *policy.latent_shape) and latents.dtype == policy.compute_dtype
    got = policy.decode(latents)
    vae = policy.vae
    with torch.no_grad():
        mean = vae.encode(torch.stack(images) * 2 - 1).latent_dist.mean
        want = (vae.decode(mean).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_other_sizes_are_fitted_by_scaling_the_shorter_side_and_cropping_the_centre(make_policy) -> None:
    policy = make_policy(height=16, width=16)
    wide = torch.zeros(3, 8, 24)
    wide[:, :, 8:16] = 1.0  # a white middle third, which is what the centre crop keeps once scaled to 16x48
    assert torch.allclose(fit_image(wide, 16, 16)[:, :, 2:-2], torch.ones(3, 16, 12), atol=1e-6)
    torch.testing.assert_close(policy.encode_image([wide]), policy.encode_image([fit_image(wide, 16, 16)]))
