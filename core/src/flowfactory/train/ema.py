"""Exponential moving average of named parameters (eval and final/ema; algorithms' old/EMA policies).

The shadow is keyed by parameter name and made with `clone`, so under FSDP2 it is sharded like the
parameters it follows. Parameters are passed in on every call, never kept: sharding replaces them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class EMA:
    """shadow <- decay * shadow + (1 - decay) * parameter, per named parameter, in float32."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        if not isinstance(params, dict):
            raise TypeError("EMA takes named parameters {name: tensor} (flowfactory.train.state.named_trainable)")
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    def _check(self, params: dict[str, torch.Tensor]) -> None:
        if params.keys() != self.shadow.keys():
            missing = sorted(set(self.shadow) ^ set(params))[:3]
            raise ValueError(f"EMA: the parameters changed since it was made (e.g. {missing})")

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        self._check(params)
        for n, p in params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    @contextmanager
    def swapped(self, params: dict[str, torch.Tensor]) -> Iterator[None]:
        """Inside, the parameters hold the EMA weights; the trained weights come back after."""
        self._check(params)
        backup = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        saved = state["shadow"]
        if not isinstance(saved, dict) or saved.keys() != self.shadow.keys():
            raise ValueError("EMA state: the saved names differ from this run's trained parameters")
        with torch.no_grad():
            for n, s in saved.items():
                if s is not self.shadow[n]:
                    self.shadow[n].copy_(s)
