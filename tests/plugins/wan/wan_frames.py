"""Test images for the wan-i2v tests (a module of its own: `from conftest import ...` resolves to whichever
conftest pytest imported last when several test folders run together)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_frames(folder: Path) -> list[Path]:
    """Small RGB PNGs of different sizes and aspect ratios (the policy resizes them to the video's size): a red
    square on grey (24x20), a blue bar on white (16x16), and noise (30x40)."""
    import numpy as np
    from PIL import Image

    square = np.full((24, 20, 3), 128, dtype=np.uint8)
    square[6:18, 4:16] = (220, 30, 30)
    bar = np.full((16, 16, 3), 255, dtype=np.uint8)
    bar[:, 5:11] = (30, 30, 220)
    noise = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    paths = []
    for name, arr in (("square", square), ("bar", bar), ("noise", noise)):
        paths.append(folder / f"{name}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


def pil(path: Path) -> Any:
    """An image file as the RGB PIL image a user hands the pipeline."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")
