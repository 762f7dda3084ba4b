"""Weight-free rewards: JPEG size (DDPO), brightness, colour match.

Brightness and colour match are differentiable (`differentiable = True`): with images that require grad they keep
the graph to their scores (reward back-propagation, `draft`); the numbers are the same either way.
"""

from __future__ import annotations

import io
import re

import numpy as np
import torch

from flowfactory.errors import RewardError
from flowfactory.types import Samples

# sRGB in [0, 1]; British and American spellings.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 0.8, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "purple": (0.5, 0.0, 0.5),
    "orange": (1.0, 0.5, 0.0),
    "pink": (1.0, 0.75, 0.8),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
    "grey": (0.5, 0.5, 0.5),
}
_WORD = re.compile(r"[a-z]+")

LUMA = (0.299, 0.587, 0.114)


def _images(samples: Samples) -> torch.Tensor:
    if samples.images is None:
        raise RewardError("this reward scores images; got samples without images")
    x = samples.images
    if x.ndim != 4:
        raise RewardError(f"images must be [B, C, H, W]; got shape {tuple(x.shape)}")
    return x.float().clamp(0, 1)  # no detach: a differentiable reward keeps the graph (out-of-place ops only)


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [0, 1] -> [B, H, W, C] uint8, rounding as PIL does."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class JPEGSize:
    """JPEG-encoded size in kB times `sign` (DDPO's (in)compressibility rewards)."""

    groupwise = False
    handles_video = False
    differentiable = False  # JPEG encoding of 8-bit pixels

    def __init__(self, quality: int = 95, sign: float = -1.0):
        self.quality = quality
        self.sign = sign

    def score(self, samples: Samples) -> torch.Tensor:
        from PIL import Image

        arr = to_uint8(_rgb(_images(samples)))
        sizes = []
        for a in arr:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        return self.sign * torch.tensor(sizes, dtype=torch.float32)


class Brightness:
    """Mean luma (Rec. 601 weights) in [0, 1]."""

    groupwise = False
    handles_video = False
    differentiable = True

    def score(self, samples: Samples) -> torch.Tensor:
        x = _rgb(_images(samples))
        w = torch.tensor(LUMA, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1).mean(dim=(1, 2)).float().cpu()


def colour_in(prompt: str) -> str | None:
    """The first colour word in a prompt, or None."""
    for w in _WORD.findall(prompt.lower()):
        if w in COLOURS:
            return w
    return None


class ColourMatch:
    """Soft share of pixels in the prompt's colour: mean of exp(-ln2 * (d / tolerance)^2), d = RGB distance.

    A pixel exactly that colour counts 1, one at distance `tolerance` counts 1/2.
    """

    groupwise = False
    handles_video = False
    differentiable = True

    def __init__(self, tolerance: float = 0.35, default: str | None = None):
        self.tolerance = tolerance
        if default is not None and default not in COLOURS:
            raise RewardError(f"colour-match default {default!r} is not a known colour ({', '.join(COLOURS)})")
        self.default = default

    def target(self, prompt: str) -> tuple[float, float, float]:
        c = colour_in(prompt) or self.default
        if c is None:
            raise RewardError(f"colour-match: the prompt {prompt!r} names no colour ({', '.join(COLOURS)}); "
                              "add one, or set the reward's `default` option")
        return COLOURS[c]

    def score(self, samples: Samples) -> torch.Tensor:
        x = _rgb(_images(samples))
        targets = torch.tensor([self.target(p) for p in samples.prompts], dtype=torch.float32, device=x.device)
        d2 = ((x - targets.view(-1, 3, 1, 1)) ** 2).sum(1)
        share = torch.exp(-np.log(2.0) * d2 / self.tolerance**2)
        return share.mean(dim=(1, 2)).float().cpu()
