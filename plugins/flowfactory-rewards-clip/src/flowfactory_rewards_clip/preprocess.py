"""CLIP image preprocessing on the device, from a loaded image processor's settings.

The steps and their order are CLIPImageProcessor's: resize (the shortest side to `size["shortest_edge"]`, the
long side to int(size * long / short), or to an exact height and width), centre crop (offsets rounded down,
zero padding when the crop is larger), rescale, normalise with the processor's image_mean and image_std. The
resize is torch's antialiased bicubic (or bilinear), whose filters are PIL's, in PIL's two passes with the clip
to [0, 1] after each; the input stays float, so nothing is rounded to 1/255 as PIL's 8-bit images are. Images
stay on their device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from flowfactory.errors import FlowFactoryError

# PIL's resampling numbers (transformers stores `resample` as one of them)
_MODES = {2: "bilinear", 3: "bicubic"}


def _field(obj: Any, key: str) -> Any:
    """`obj[key]` for a dict, `obj.key` for transformers' SizeDict; None when absent."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


@dataclass(frozen=True)
class ImageTransform:
    shortest_edge: int | None  # resize the shortest side to this ...
    resize_to: tuple[int, int] | None  # ... or to exactly (height, width); both None: no resize
    crop: tuple[int, int] | None  # centre crop (height, width), or None
    scale: float  # what a [0, 1] value is multiplied by before normalising (1 for the usual 255 * 1/255)
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    mode: str = "bicubic"

    @classmethod
    def from_processor(cls, image_processor: Any, where: str) -> ImageTransform:
        """The transform a CLIP image processor applies; `where` names the option it came from, for errors."""
        def flag(name: str) -> bool:
            value = getattr(image_processor, name, None)
            return True if value is None else bool(value)

        shortest = resize_to = crop = None
        if flag("do_resize"):
            size = getattr(image_processor, "size", None)
            if _field(size, "shortest_edge"):
                shortest = int(_field(size, "shortest_edge"))
            elif _field(size, "height") and _field(size, "width"):
                resize_to = (int(_field(size, "height")), int(_field(size, "width")))
            else:
                raise FlowFactoryError(
                    f"{where}: the image processor's size {size!r} has neither shortest_edge nor height and "
                    "width; point the option at a CLIP processor folder or hub id")
        if flag("do_center_crop"):
            cs = getattr(image_processor, "crop_size", None)
            if not (_field(cs, "height") and _field(cs, "width")):
                raise FlowFactoryError(f"{where}: the image processor's crop_size {cs!r} needs height and width")
            crop = (int(_field(cs, "height")), int(_field(cs, "width")))
        resample = getattr(image_processor, "resample", 3)
        resample = int(getattr(resample, "value", resample)) if resample is not None else 3
        if resample not in _MODES:
            raise FlowFactoryError(
                f"{where}: the image processor resamples with PIL filter {resample}; only bicubic (3) and "
                "bilinear (2) are reproduced on the device")
        factor = float(getattr(image_processor, "rescale_factor", 1 / 255) or 1 / 255)
        scale = 255.0 * factor if flag("do_rescale") else 255.0
        mean = std = None
        if flag("do_normalize"):
            mean = tuple(float(v) for v in _as_list(image_processor.image_mean))
            std = tuple(float(v) for v in _as_list(image_processor.image_std))
        return cls(shortest, resize_to, crop, scale, mean, std, _MODES[resample])

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize, as transformers computes it."""
        if self.shortest_edge is not None:
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        if self.resize_to is not None:
            return self.resize_to
        return height, width

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [0, 1] (C = 1 or 3; more keeps the first 3) -> [B, 3, h, w] float32, same device.
        Out-of-place ops only: when `images` require grad, the result keeps the graph to them."""
        x = images.float().clamp(0, 1)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
        h, w = self.output_size(x.shape[-2], x.shape[-1])
        # PIL resizes in two passes, horizontal then vertical, storing each as 8-bit, which clips the filters'
        # overshoot in between; the same two passes with the clip (but no rounding) keep to it within 1/255
        if w != x.shape[-1]:
            x = F.interpolate(x, size=(x.shape[-2], w), mode=self.mode, align_corners=False, antialias=True)
            x = x.clamp(0, 1)
        if h != x.shape[-2]:
            x = F.interpolate(x, size=(h, w), mode=self.mode, align_corners=False, antialias=True).clamp(0, 1)
        if self.crop is not None:
            x = _centre_crop(x, self.crop)
        x = x * self.scale
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x.contiguous()


def _as_list(value: Any) -> list[float]:
    return [value] * 3 if isinstance(value, (int, float)) else list(value)


def _centre_crop(x: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """transformers' centre crop: top = (H - h) // 2, left = (W - w) // 2; a crop larger than the image pads it
    with zeros first, centred (ceil of half the difference on the top/left)."""
    h, w = x.shape[-2:]
    ch, cw = crop
    if ch > h or cw > w:
        ph, pw = max(ch, h), max(cw, w)
        top, left = -(-(ph - h) // 2), -(-(pw - w) // 2)
        x = F.pad(x, (left, pw - w - left, top, ph - h - top))
        h, w = ph, pw
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top:top + ch, left:left + cw]
