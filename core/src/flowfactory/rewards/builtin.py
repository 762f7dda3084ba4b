"""Weight-free rewards: JPEG size (DDPO), brightness, colour match, and for editing models edit colour.

Brightness, colour match and edit colour are differentiable (`differentiable = True`): with images that require
grad they keep the graph to their scores (reward back-propagation, `draft`); the numbers are the same either way.
"""

from __future__ import annotations

import io
import re

import numpy as np
import torch

from flowfactory.errors import RewardError
from flowfactory.prompts import Prompt
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
_HEX = re.compile(r"^#([0-9a-fA-F]{6})$")

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


class EditColour:
    """An edit toward a colour inside a region that keeps the rest of the source image.

    score = exp(-ln2 * (d / tolerance)^2) - keep_weight * change, where d is the RGB distance between the region's
    mean colour and the target colour, and change the mean absolute difference (over pixels and channels) between
    the sample and its source outside the region (0 when the region is the whole image). The source is the prompt
    record's first input image, resized to the sample's size by area averaging. The target and region come from
    the record's metadata (see `target` and `region`).
    """

    groupwise = False
    handles_video = False
    differentiable = True

    def __init__(self, tolerance: float = 0.35, keep_weight: float = 1.0):
        self.tolerance = tolerance
        self.keep_weight = keep_weight

    @staticmethod
    def target(record: Prompt) -> tuple[float, float, float]:
        """metadata `colour` (or `color`): a colour name, "#rrggbb", or [r, g, b] in [0, 1]; else the first colour
        word of the instruction ("make the square red")."""
        spec = record.metadata.get("colour", record.metadata.get("color"))
        where = f"edit-colour: the prompt {record.text!r}"
        if spec is None:
            name = colour_in(record.text)
            if name is None:
                raise RewardError(f"{where} names no target colour: set `colour` in its metadata (a name, "
                                  f'"#rrggbb" or [r, g, b] in [0, 1]) or name one in the text ({", ".join(COLOURS)})')
            return COLOURS[name]
        if isinstance(spec, str):
            if spec.lower() in COLOURS:
                return COLOURS[spec.lower()]
            if (m := _HEX.match(spec)) is not None:
                v = int(m.group(1), 16)
                return ((v >> 16 & 255) / 255.0, (v >> 8 & 255) / 255.0, (v & 255) / 255.0)
        elif (isinstance(spec, (list, tuple)) and len(spec) == 3
              and all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 1 for c in spec)):
            return (float(spec[0]), float(spec[1]), float(spec[2]))
        raise RewardError(f"{where} has colour {spec!r}: give a colour name ({', '.join(COLOURS)}), \"#rrggbb\" or "
                          f"[r, g, b] with each in [0, 1]")

    @staticmethod
    def region(record: Prompt, height: int, width: int) -> torch.Tensor:
        """metadata `region` [x0, y0, x1, y1] in relative coordinates (0..1, x across, y down) as a bool mask
        [H, W]: the pixels whose centres lie in [x0, x1) x [y0, y1). No `region`: the whole image."""
        box = record.metadata.get("region")
        if box is None:
            return torch.ones(height, width, dtype=torch.bool)
        ok = (isinstance(box, (list, tuple)) and len(box) == 4
              and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in box))
        if not ok or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
            raise RewardError(f"edit-colour: the prompt {record.text!r} has region {box!r}: give [x0, y0, x1, y1] "
                              f"with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (relative to the width and height)")
        ys = (torch.arange(height, dtype=torch.float64) + 0.5) / height
        xs = (torch.arange(width, dtype=torch.float64) + 0.5) / width
        mask = ((ys >= box[1]) & (ys < box[3]))[:, None] & ((xs >= box[0]) & (xs < box[2]))[None, :]
        if not bool(mask.any()):
            raise RewardError(f"edit-colour: the prompt {record.text!r} has region {list(box)}, which holds no pixel "
                              f"centre of a {width}x{height} sample; make it larger")
        return mask

    def score(self, samples: Samples) -> torch.Tensor:
        x = _rgb(_images(samples))
        if len(samples.inputs) != len(samples):
            raise RewardError("edit-colour compares each sample with its prompt's input image, but these samples "
                              "carry no prompt records (Samples.inputs); build them with Samples.of(records, ...)")
        _, _, h, w = x.shape
        out = []
        for img, record in zip(x, samples.inputs, strict=True):
            if not record.images:
                raise RewardError(f"edit-colour: the prompt {record.text!r} has no input image to compare its edit "
                                  f"with; give it one ('image' in its .jsonl line)")
            target = torch.tensor(self.target(record), dtype=torch.float32, device=x.device)
            mask = self.region(record, h, w).to(x.device)
            mean = img[:, mask].mean(dim=1)
            closeness = torch.exp(-np.log(2.0) * ((mean - target) ** 2).sum() / self.tolerance**2)
            if bool(mask.all()):
                out.append(closeness)
                continue
            source = record.load_images()[0].to(device=x.device)
            if tuple(source.shape[1:]) != (h, w):
                source = torch.nn.functional.interpolate(source[None], size=(h, w), mode="area")[0]
            change = (img - source)[:, ~mask].abs().mean()
            out.append(closeness - self.keep_weight * change)
        return torch.stack(out).float().cpu()
