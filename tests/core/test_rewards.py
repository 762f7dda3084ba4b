"""The built-in rewards' values on made-up images, against numbers worked out here."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from flowfactory.errors import RewardError
from flowfactory.registry import BuildContext, Registry
from flowfactory.testing import load_registry
from flowfactory.types import Samples

RED, GREEN, BLUE = (1.0, 0.0, 0.0), (0.0, 0.8, 0.0), (0.0, 0.0, 1.0)
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def registry() -> Registry:
    """Built-ins and the toy policy only: core's tests do not depend on installed plugin packages."""
    return load_registry(entry_points=False)


def reward(registry: Registry, name: str, **options: Any) -> Any:
    return registry.get("reward", name).create(options, BuildContext())


def solid(rgb: tuple[float, ...], size: int = 8) -> torch.Tensor:
    """One image [1, C, size, size] filled with `rgb` (C = len(rgb))."""
    return torch.tensor(rgb, dtype=torch.float32).view(1, -1, 1, 1).expand(1, len(rgb), size, size).clone()


def halves(left: tuple[float, ...], right: tuple[float, ...], size: int = 8) -> torch.Tensor:
    """Left half one colour, right half another."""
    img = solid(left, size)
    img[..., size // 2:] = torch.tensor(right).view(1, -1, 1, 1)
    return img


def score(r: Any, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    out = r.score(Samples(prompts=prompts, images=images, group_ids=list(range(len(prompts)))))
    assert out.dtype == torch.float32 and tuple(out.shape) == (len(prompts),)
    return out


def falloff(d2: float, tolerance: float) -> float:
    """exp(-ln2 * d^2 / tol^2): 1 on the colour, 1/2 at distance `tolerance`."""
    return math.exp(-LN2 * d2 / tolerance**2)


# --- colour-match -------------------------------------------------------------------------------------------

def test_colour_match_of_solid_colours(registry: Registry) -> None:
    r = reward(registry, "colour-match")
    red = solid(RED)
    got = score(r, red.expand(3, -1, -1, -1), ["a red square", "a blue square", "a green square"])
    assert float(got[0]) == 1.0
    assert float(got[1]) == pytest.approx(falloff(2.0, 0.35), rel=1e-5)  # d^2 = 1 + 1
    assert float(got[2]) == pytest.approx(falloff(1.0 + 0.64, 0.35), rel=1e-5)  # green is (0, 0.8, 0)


@pytest.mark.parametrize("tolerance", [0.2, 0.5, 1.0])
def test_colour_match_is_one_half_at_the_tolerance(registry: Registry, tolerance: float) -> None:
    r = reward(registry, "colour-match", tolerance=tolerance)
    near = solid((1.0 - tolerance, 0.0, 0.0))  # at distance `tolerance` from red
    assert float(score(r, near, ["red"])[0]) == pytest.approx(0.5, abs=1e-6)
    assert float(score(r, solid(RED), ["a blue square"])[0]) == pytest.approx(falloff(2.0, tolerance), rel=1e-5)


def test_colour_match_averages_over_pixels(registry: Registry) -> None:
    r = reward(registry, "colour-match", tolerance=1.0)
    img = halves(RED, BLUE)
    got = score(r, img.expand(2, -1, -1, -1), ["a red square", "a blue square"])
    expected = (1.0 + falloff(2.0, 1.0)) / 2  # = 0.625
    assert got.tolist() == pytest.approx([expected, expected], rel=1e-6)
    assert expected == pytest.approx(0.625)


def test_colour_match_against_numpy_on_random_images(registry: Registry) -> None:
    r = reward(registry, "colour-match", tolerance=0.4)
    images = torch.rand(3, 3, 6, 5, generator=torch.Generator().manual_seed(0))
    prompts = ["a Purple cat", "an orange", "pink and blue"]
    targets = np.array([(0.5, 0.0, 0.5), (1.0, 0.5, 0.0), (1.0, 0.75, 0.8)])
    d2 = ((images.double().numpy() - targets[:, :, None, None]) ** 2).sum(1)
    expected = np.exp(-LN2 * d2 / 0.4**2).mean(axis=(1, 2))
    np.testing.assert_allclose(score(r, images, prompts).numpy(), expected, rtol=1e-5)


def test_colour_words(registry: Registry) -> None:
    r = reward(registry, "colour-match")
    grey = solid((0.5, 0.5, 0.5)).expand(2, -1, -1, -1)
    assert score(r, grey, ["a grey sky", "a GRAY sky"]).tolist() == [1.0, 1.0]  # both spellings, any case
    red_and_blue = halves(RED, BLUE)
    first = score(r, red_and_blue.expand(2, -1, -1, -1), ["a blue and red ball", "a red and blue ball"])
    assert float(first[0]) == pytest.approx(float(score(r, red_and_blue, ["blue"])[0]))  # the first colour wins
    assert float(first[1]) == pytest.approx(float(score(r, red_and_blue, ["red"])[0]))


def test_colour_match_expands_one_channel_images(registry: Registry) -> None:
    r = reward(registry, "colour-match")
    assert score(r, solid((1.0,)), ["a white cat"]).tolist() == [1.0]
    assert score(r, solid((0.0,)), ["a black cat"]).tolist() == [1.0]


def test_colour_match_default_colour(registry: Registry) -> None:
    r = reward(registry, "colour-match", default="blue")
    got = score(r, solid(BLUE).expand(2, -1, -1, -1), ["a square", "a red square"])
    assert float(got[0]) == 1.0  # no colour named: the default
    assert float(got[1]) == pytest.approx(falloff(2.0, 0.35), rel=1e-5)  # a named colour beats the default


def test_colour_match_prompt_without_colour_names_prompt_and_fix(registry: Registry) -> None:
    r = reward(registry, "colour-match")
    # "redundant" contains "red" but is not the word red.
    with pytest.raises(RewardError, match=r"'a redundant square' names no colour.*add one, or set the reward's "
                                          r"`default` option"):
        score(r, solid(RED).expand(2, -1, -1, -1), ["a red square", "a redundant square"])


def test_colour_match_unknown_default_is_an_error(registry: Registry) -> None:
    with pytest.raises(RewardError, match="'teal' is not a known colour"):
        reward(registry, "colour-match", default="teal")


# --- brightness ---------------------------------------------------------------------------------------------

def test_brightness_uses_rec601_weights(registry: Registry) -> None:
    r = reward(registry, "brightness")
    images = torch.cat([solid(RED), solid((0.0, 1.0, 0.0)), solid(BLUE), solid((1.0, 1.0, 1.0)),
                        solid((0.0, 0.0, 0.0)), halves((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))])
    got = score(r, images, ["p"] * 6)
    assert got.tolist() == pytest.approx([0.299, 0.587, 0.114, 1.0, 0.0, 0.5], abs=1e-6)


def test_brightness_against_numpy(registry: Registry) -> None:
    r = reward(registry, "brightness")
    images = torch.rand(4, 3, 7, 9, generator=torch.Generator().manual_seed(1))
    rgb = images.double().numpy()
    expected = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).mean(axis=(1, 2))
    np.testing.assert_allclose(score(r, images, ["p"] * 4).numpy(), expected, rtol=1e-5)


def test_brightness_of_grey_and_rgba_images(registry: Registry) -> None:
    r = reward(registry, "brightness")
    assert float(score(r, solid((0.3,)), ["p"])[0]) == pytest.approx(0.3, abs=1e-6)  # weights sum to 1
    rgba = solid((0.2, 0.4, 0.6, 0.0))  # alpha is ignored
    assert float(score(r, rgba, ["p"])[0]) == pytest.approx(0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6, abs=1e-6)
    assert float(score(r, solid((2.0, 2.0, 2.0)), ["p"])[0]) == pytest.approx(1.0)  # clamped to [0, 1]


# --- JPEG ---------------------------------------------------------------------------------------------------

def pil_kilobytes(image: torch.Tensor, quality: int) -> float:
    """JPEG size in kB of one [C, H, W] image in [0, 1], encoded with PIL here."""
    rgb = image.expand(3, -1, -1) if image.shape[0] == 1 else image
    arr = np.rint(rgb.permute(1, 2, 0).double().numpy() * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue()) / 1000.0


def jpeg_images() -> torch.Tensor:
    flat = solid((0.4, 0.5, 0.6), size=32)
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    smooth = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32)
    return torch.cat([flat, noise, smooth])


def test_jpeg_flat_is_more_compressible_than_noise(registry: Registry) -> None:
    images = jpeg_images()
    comp = score(reward(registry, "jpeg-compressibility"), images, ["p"] * 3)
    incomp = score(reward(registry, "jpeg-incompressibility"), images, ["p"] * 3)
    assert bool((comp < 0).all()) and bool((incomp > 0).all())
    assert float(comp[0]) > float(comp[2]) > float(comp[1])  # flat, then a gradient, then noise
    assert float(incomp[0]) < float(incomp[2]) < float(incomp[1])
    torch.testing.assert_close(comp, -incomp)


@pytest.mark.parametrize("quality", [95, 50, 10])
def test_jpeg_values_equal_a_pil_encoding(registry: Registry, quality: int) -> None:
    images = jpeg_images()
    expected = [pil_kilobytes(img, quality) for img in images]
    got = score(reward(registry, "jpeg-incompressibility", quality=quality), images, ["p"] * 3)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    got = score(reward(registry, "jpeg-compressibility", quality=quality), images, ["p"] * 3)
    assert got.tolist() == pytest.approx([-e for e in expected], rel=1e-6)


def test_jpeg_quality_changes_the_size_of_noise(registry: Registry) -> None:
    noise = jpeg_images()[1:2]
    high = score(reward(registry, "jpeg-incompressibility", quality=95), noise, ["p"])
    low = score(reward(registry, "jpeg-incompressibility", quality=10), noise, ["p"])
    assert float(high[0]) > 2 * float(low[0])


def test_jpeg_of_one_channel_images(registry: Registry) -> None:
    grey = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    got = score(reward(registry, "jpeg-incompressibility"), grey, ["p"])
    assert float(got[0]) == pytest.approx(pil_kilobytes(grey[0], 95), rel=1e-6)


def test_jpeg_quality_option_is_validated(registry: Registry) -> None:
    from pydantic import ValidationError

    for bad in (0, 101):
        with pytest.raises(ValidationError, match="quality"):
            registry.get("reward", "jpeg-compressibility").validate_options({"quality": bad})


# --- shapes and errors, every built-in ----------------------------------------------------------------------

BUILTINS = ["colour-match", "brightness", "jpeg-compressibility", "jpeg-incompressibility"]


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_is_pointwise_image_reward(registry: Registry, name: str) -> None:
    r = reward(registry, name)
    assert type(r).groupwise is False and type(r).handles_video is False
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    got = score(r, images, ["a red square"] * 5)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("name", BUILTINS)
def test_wrong_shapes_are_reward_errors(registry: Registry, name: str) -> None:
    r = reward(registry, name)
    with pytest.raises(RewardError, match=r"images must be \[B, C, H, W\]; got shape \(3, 8, 8\)"):
        r.score(Samples(prompts=["a red square"], images=torch.rand(3, 8, 8)))
    with pytest.raises(RewardError, match=r"got shape \(1, 2, 3, 8, 8\)"):
        r.score(Samples(prompts=["a red square"], images=torch.rand(1, 2, 3, 8, 8)))
    with pytest.raises(RewardError, match="scores images; got samples without images"):
        r.score(Samples(prompts=["a red square"], videos=torch.rand(1, 2, 3, 8, 8)))
