"""Text rendered with PIL's own font, for the OCR reward's tests (a plain module, so a contract class's
`images` classmethod can use it too)."""

from __future__ import annotations

import torch


def render_text(text: str | list[str], width: int = 256, height: int = 96, size: int = 28,
                ink: tuple[int, int, int] = (0, 0, 0), paper: tuple[int, int, int] = (255, 255, 255)) -> torch.Tensor:
    """[3, H, W] float in [0, 1]: `text` (a list: one line each) in PIL's default font, left-aligned with a
    12 px margin and vertically centred."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    lines = [text] if isinstance(text, str) else text
    image = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=size)
    step = int(size * 1.5)
    top = (height - step * (len(lines) - 1) - size) // 2
    for i, line in enumerate(lines):
        draw.text((12, top + i * step), line, fill=ink, font=font)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
