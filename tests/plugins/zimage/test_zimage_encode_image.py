"""ZImagePolicy.encode_image, the inverse of decode that dataset algorithms (sft, offline dpo) use: decoding its
latents equals the VAE's own encode-mean-decode round trip computed here, and images of another size are fitted
(shorter side scaled, centre crop) first."""

from __future__ import annotations

import torch

from flowfactory.prompts import fit_image


def test_decode_of_encode_image_is_the_vaes_round_trip(make_policy) -> None:
    policy = make_policy(height=16, width=16)
    images = [torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    latents = policy.encode_image(images)
    assert tuple(latents.shape) == (3, *policy.latent_shape) and latents.dtype == torch.float32
    vae = policy.vae
    with torch.no_grad():
        mean = vae.encode(torch.stack(images) * 2 - 1).latent_dist.mean
        torch.testing.assert_close(latents, (mean - 0.1159) * 0.3611, atol=1e-6, rtol=0)  # the tiny VAE's shift, scale
        want = (vae.decode(mean).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(policy.decode(latents), want, atol=1e-5, rtol=1e-5)


def test_other_sizes_are_fitted_first(make_policy) -> None:
    policy = make_policy(height=16, width=16)
    wide = torch.rand(3, 8, 24, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(policy.encode_image([wide]), policy.encode_image([fit_image(wide, 16, 16)]))
