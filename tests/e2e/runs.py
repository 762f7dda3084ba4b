"""What the end-to-end tests share about a run's outputs and launches: its metrics rows, its final toy weights,
an in-process training call, and a free port for a multi-process rendezvous. Imported by the test modules
beside it (pytest puts this folder on sys.path)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch

from flowfactory.config import load
from flowfactory.train import run


def rows(out: Path) -> list[dict]:
    """The run's metrics.jsonl, one dict per epoch."""
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    """The toy policy's final weights by name."""
    return torch.load(out / "final" / "toy.pt")


def same_weights(a: Path, b: Path) -> bool:
    """True when two runs' final toy weights are bit-identical."""
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def train(path: Path, out: Path, overrides: list[str] | None = None, resume: bool = False):
    """`flowfactory.train.run` on a config file, in this process, without a progress bar."""
    cfg, options = load(path, overrides)
    return run(cfg, options, output_dir=str(out), resume=resume, show_progress=False)


def free_port() -> int:
    """A TCP port nothing listens on now, for a torchrun rendezvous (a fixed one can still be held)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
