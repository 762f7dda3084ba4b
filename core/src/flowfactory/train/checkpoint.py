"""Checkpoints: trainable weights, optimizer and EMA state, and the epoch, written atomically.

A checkpoint is written to `checkpoints/.tmp-<epoch>` and renamed to `checkpoints/<epoch>` once complete,
so a crash mid-write leaves the previous checkpoint intact and no half-written one is ever resumed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

STATE = "state.pt"
META = "trainer.json"


def save(root: Path, epoch: int, state: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{epoch:06d}"
    tmp = root / f".tmp-{epoch:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(state, tmp / STATE)
    (tmp / META).write_text(json.dumps({"epoch": epoch, **meta}, indent=2))
    with open(tmp / META) as f:  # flush the directory's contents before it becomes visible
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.isdigit() and (d / META).is_file() and (d / STATE).is_file()]
    return sorted(dirs, key=lambda d: int(d.name))


def latest(root: Path) -> Path | None:
    found = complete(root)
    return found[-1] if found else None


def load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    meta = json.loads((path / META).read_text())
    return state, meta
