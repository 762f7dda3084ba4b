"""The prompt record: what one row of a prompt set holds, and what `Policy.encode` and the rewards receive.

A record is the prompt text, the input images an image-conditioned model (an editing model, image-to-video)
reads, named target images a dataset algorithm learns from (SFT's `target`, offline DPO's `chosen` and
`rejected`), and any other fields of its `.jsonl` line as `metadata` (GenEval's `tag`/`include`, a
category). Image paths are absolute once loaded (a `.jsonl` file names them relative to itself).

`key` is what the model's conditioning depends on: the text alone for a text-only record (so a text prompt's
key is the prompt, as before records existed), else the text and the SHA-256 of every input image's bytes, in
order. Two edits with the same instruction and different source images have different keys; moving or
renaming an image file keeps its key. Metadata and targets do not enter the key (they do not change the
conditioning).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

INPUT_FIELDS = ("image", "images")  # .jsonl fields naming input (conditioning) images
TARGET_FIELDS = ("target", "chosen", "rejected")  # .jsonl fields naming target images (dataset algorithms)


@dataclass(frozen=True, eq=False)
class Prompt:
    """One prompt record. `images`: input image files, in the order the model takes them; `targets`: named
    target image files; `metadata`: every other field of the data line. Build with `Prompt(text)` or
    `Prompt(text, images=[...])`; file digests are read once, at construction (a missing file raises
    FileNotFoundError, an unreadable one OSError)."""

    text: str
    images: tuple[Path, ...] = ()
    targets: Mapping[str, Path] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    digests: tuple[str, ...] = field(default=(), repr=False)  # sha256 of each input image's bytes

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"Prompt.text must be a str, got {type(self.text).__name__}")
        images = tuple(Path(p) for p in self.images)
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "targets", {str(k): Path(v) for k, v in dict(self.targets).items()})
        object.__setattr__(self, "metadata", dict(self.metadata))
        if len(self.digests) != len(images):
            object.__setattr__(self, "digests", tuple(file_digest(p) for p in images))

    @property
    def key(self) -> str:
        """The text for a text-only record; else the text and the input images' content digests."""
        if not self.images:
            return self.text
        return self.text + "".join(f"\n[image sha256:{d}]" for d in self.digests)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Prompt) and (self.key, self.targets, self.metadata) == (
            other.key, other.targets, other.metadata)

    def __hash__(self) -> int:
        return hash(self.key)

    def __str__(self) -> str:
        return self.text

    def load_images(self) -> list[torch.Tensor]:
        """The input images as float32 [3, H, W] tensors in [0, 1] (RGB), in order; decoded files are cached."""
        return [load_image(p, d) for p, d in zip(self.images, self.digests, strict=True)]

    def load_target(self, name: str) -> torch.Tensor:
        """Target image `name` (e.g. "target", "chosen") as float32 [3, H, W] in [0, 1]."""
        if name not in self.targets:
            raise KeyError(f"prompt {self.text!r} has no {name!r} image (it has: {', '.join(self.targets) or 'none'})")
        return load_image(self.targets[name], file_digest(self.targets[name]))

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict that `Prompt.from_json` turns back into an equal record (paths absolute)."""
        out: dict[str, Any] = {"prompt": self.text}
        if self.images:
            out["images"] = [str(p) for p in self.images]
            out["digests"] = list(self.digests)
        out.update({k: str(v) for k, v in self.targets.items()})
        out["metadata"] = dict(self.metadata)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Prompt:
        images = tuple(obj.get("images", ()))
        digests = tuple(obj.get("digests", ()))
        return cls(str(obj["prompt"]), images=images, targets={k: obj[k] for k in TARGET_FIELDS if k in obj},
                   metadata=obj.get("metadata", {}), digests=digests if len(digests) == len(images) else ())


def as_prompt(p: str | Prompt) -> Prompt:
    """A record for `p` (a plain string becomes a text-only record)."""
    return p if isinstance(p, Prompt) else Prompt(str(p))


def as_prompts(prompts: Iterable[str | Prompt]) -> list[Prompt]:
    return [as_prompt(p) for p in prompts]


def texts(prompts: Iterable[str | Prompt]) -> list[str]:
    """The text of each prompt (records or plain strings): what a text-only policy's `encode` tokenizes."""
    return [p.text if isinstance(p, Prompt) else str(p) for p in prompts]


def file_digest(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    return _digest(str(Path(path).resolve()), *_stat(path))


def _stat(path: str | Path) -> tuple[int, int]:
    st = Path(path).stat()
    return st.st_size, st.st_mtime_ns


@lru_cache(maxsize=4096)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=64)
def load_image(path: str | Path, digest: str) -> torch.Tensor:
    """An image file as float32 [3, H, W] in [0, 1] (RGB); cached by (path, content digest). Read only as pixels
    by PIL (no code in an image file runs)."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def check_image(path: Path) -> str | None:
    """None when `path` is an image PIL can read, else why not (for `ff validate`)."""
    if not path.is_file():
        return "no such file" if not path.exists() else "not a file"
    try:
        from PIL import Image, UnidentifiedImageError

        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"not a readable image ({exc})"
    return None



def fit_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An image [C, h, w] (or a batch [B, C, h, w]) resized so it covers height x width (its shorter side scaled,
    bicubic with antialiasing, clamped to [0, 1]) and centre-cropped to exactly that size."""
    import torch.nn.functional as F

    batch = image if image.ndim == 4 else image[None]
    h, w = batch.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        batch = F.interpolate(batch.float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    out = batch[..., top:top + height, left:left + width].clamp(0, 1)
    return out if image.ndim == 4 else out[0]
