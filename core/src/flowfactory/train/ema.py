"""Exponential moving average of the trainable parameters (used for eval and saved beside final/)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class EMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self, params: list[torch.nn.Parameter]) -> None:
        for s, p in zip(self.shadow, params, strict=True):
            s.lerp_(p.detach().float(), 1.0 - self.decay)

    @contextmanager
    def swapped(self, params: list[torch.nn.Parameter]) -> Iterator[None]:
        """Inside, the parameters hold the EMA weights; the trained weights come back after."""
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for s, p in zip(self.shadow, params):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, params):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = [s.to(d.device) for s, d in zip(state["shadow"], self.shadow, strict=True)]
