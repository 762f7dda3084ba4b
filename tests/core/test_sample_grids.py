"""Sample grids a person looks at: PNG grids of images, and for videos a frame strip plus an animated GIF."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from flowfactory.train.logging import save_grid

# solid colours, so that every pixel of a cell is known after scaling and GIF palette conversion
RED, GREEN, BLUE, WHITE = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 1.0)


def solid(colour: tuple[float, float, float], size: int = 8) -> torch.Tensor:
    return torch.tensor(colour).view(3, 1, 1).expand(3, size, size)


def test_image_grid_layout_and_pixels(tmp_path: Path) -> None:
    images = torch.stack([solid(RED), solid(GREEN), solid(BLUE)])
    save_grid(images, ["a", "b", "c"], tmp_path / "g.png", columns=2, cell=32)
    grid = Image.open(tmp_path / "g.png").convert("RGB")
    assert grid.size == (2 * 32, 2 * (32 + 28))  # 8 px scaled x4, two rows with a caption band each
    assert grid.getpixel((5, 5)) == (255, 0, 0) and grid.getpixel((37, 5)) == (0, 255, 0)
    assert grid.getpixel((5, 60 + 5)) == (0, 0, 255)
    assert not (tmp_path / "g.gif").exists()


def test_video_grid_writes_a_frame_strip_and_an_animated_gif(tmp_path: Path) -> None:
    colours = [RED, GREEN, BLUE, WHITE, RED]  # 5 frames
    video = torch.stack([solid(c) for c in colours])  # [T, C, H, W]
    videos = torch.stack([video, video.flip(0)])  # [2, 5, 3, 8, 8]
    save_grid(videos, ["forward", "backward"], tmp_path / "v.png", columns=2, cell=32, fps=10)

    strip = Image.open(tmp_path / "v.png").convert("RGB")
    assert strip.size == (2 * 4 * 32, 32 + 28)  # 4 evenly spaced frames (0, 1, 3, 4) side by side per sample
    assert [strip.getpixel((32 * k + 5, 5)) for k in range(4)] == [(255, 0, 0), (0, 255, 0), (255, 255, 255),
                                                                   (255, 0, 0)]

    gif = Image.open(tmp_path / "v.gif")
    assert gif.n_frames == 5 and gif.size == (2 * 32, 32 + 28) and gif.info["duration"] == 100
    seen = []
    for i in range(gif.n_frames):
        gif.seek(i)
        frame = gif.convert("RGB")
        seen.append((frame.getpixel((5, 5)), frame.getpixel((32 + 5, 5))))
    expected = [tuple(round(v * 255) for v in c) for c in colours]
    assert seen == list(zip(expected, expected[::-1]))
