"""What a run leaves to look at: metrics.jsonl, tensorboard, PNG sample grids with captions."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from flowfactory.errors import FlowFactoryError
from flowfactory.train.runfolder import write_error


class MetricsLog:
    """One JSON object per epoch in metrics.jsonl, mirrored to tensorboard when available and enabled."""

    def __init__(self, out: Path, tensorboard: bool, resume_epoch: int | None):
        self.path = out / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            keep = [r for r in read_metrics(self.path)
                    if resume_epoch is not None and r.get("epoch", 0) <= resume_epoch]
            self.rows = keep
            tmp = self.path.with_name(self.path.name + ".tmp")
            try:  # replaced whole, so a crash now leaves the old rows or the new ones, never a part
                tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
                os.replace(tmp, self.path)
            except OSError as exc:
                raise write_error(exc, self.path) from exc
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                self.writer = None

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as exc:  # a torn row is dropped on --resume (`read_metrics`)
            raise write_error(exc, self.path) from exc
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. A last line that is not a JSON object was cut short by a crash while it was
    written: it is dropped, with a message on stderr. Any other bad line is an error naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise FlowFactoryError(f"cannot read {path}: {exc.strerror}") from exc
    numbered = [(i, ln) for i, ln in enumerate(lines, 1) if ln.strip()]
    rows = []
    for k, (i, ln) in enumerate(numbered):
        try:
            row = json.loads(ln)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as exc:
            if k == len(numbered) - 1:
                print(f"flowfactory: {path}: dropped its last line (line {i}), cut short by a crash while it was "
                      f"written: {ln[:60]!r}{'...' if len(ln) > 60 else ''}", file=sys.stderr)
                break
            raise FlowFactoryError(
                f"{path}:{i}: not a metrics row ({exc}); only a torn last line is dropped on its own. Repair or "
                f"delete line {i}, then --resume again.") from exc
        rows.append(row)
    return rows


def save_grid(images: torch.Tensor, captions: list[str], path: Path, columns: int = 4, cell: int = 128,
              fps: int = 8) -> None:
    """A PNG grid of images [N, C, H, W] with captions. Videos [N, T, C, H, W] give a PNG with up to 4 evenly
    spaced frames side by side per sample, and beside it an animated GIF (same name, .gif) of the whole
    videos at `fps`, one grid per frame."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if images.ndim == 5:  # videos
        t = images.shape[1]
        idx = torch.linspace(0, t - 1, min(t, 4)).round().long()
        _grid(torch.cat(list(images[:, idx].unbind(1)), dim=3), captions, columns, cell).save(path)
        frames = [_grid(images[:, i], captions, columns, cell) for i in range(t)]
        frames = [f.convert("P", palette=Image.ADAPTIVE) for f in frames]
        frames[0].save(path.with_suffix(".gif"), save_all=True, append_images=frames[1:],
                       duration=max(1, round(1000 / fps)), loop=0)
        return
    _grid(images, captions, columns, cell).save(path)


def _grid(images: torch.Tensor, captions: list[str], columns: int, cell: int) -> Any:
    """images [N, C, H, W] in [0, 1] as one captioned PIL image, `columns` per row, scaled up to ~`cell` px."""
    from PIL import Image, ImageDraw, ImageFont

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    n = len(arr)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    h, w = arr.shape[1], arr.shape[2]
    scale = max(1, cell // max(h, 1))
    cw, ch = w * scale, h * scale
    cap_h = 28
    grid = Image.new("RGB", (cols * cw, rows * (ch + cap_h)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, a in enumerate(arr):
        img = Image.fromarray(a if a.shape[2] != 1 else a[:, :, 0]).convert("RGB").resize((cw, ch), Image.NEAREST)
        x, y = (i % cols) * cw, (i // cols) * (ch + cap_h)
        grid.paste(img, (x, y))
        text = captions[i] if i < len(captions) else ""
        max_chars = max(8, cw // 6)
        lines = [text[j:j + max_chars] for j in range(0, min(len(text), 2 * max_chars), max_chars)]
        for k, ln in enumerate(lines):
            draw.text((x + 2, y + ch + 2 + 12 * k), ln, fill="black", font=font)
    return grid


def reward_windows(rewards: list[float], most: int = 5) -> tuple[float, float, int]:
    """(mean of the first w, mean of the last w, w) for a run's per-epoch mean rewards, w = min(most, n // 2):
    the two windows never overlap, so a short run is not compared with itself. w = 0 (and NaN means) when the
    run has fewer than two epochs: too short to compare."""
    w = min(most, len(rewards) // 2)
    if w == 0:
        return math.nan, math.nan, 0
    return sum(rewards[:w]) / w, sum(rewards[-w:]) / w, w
