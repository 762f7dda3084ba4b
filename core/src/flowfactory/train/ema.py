"""Exponential moving average of named parameters (eval and final/ema; algorithms' old/EMA policies).

A `flowfactory.algorithms.ParamSnapshot` that moves: the shadow is keyed by parameter name, kept in float32 and
made with `clone`, so under FSDP2 it is sharded like the parameters it follows. Parameters are passed in on every
call, never kept: sharding replaces them.
"""

from __future__ import annotations

from typing import Any

import torch

from flowfactory.algorithms import ParamSnapshot


class EMA(ParamSnapshot):
    """shadow <- decay * shadow + (1 - decay) * parameter, per named parameter, in float32; `swapped(params)`
    puts the average in the parameters' place (a snapshot that `update` moves)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        if not isinstance(params, dict):
            raise TypeError("EMA takes named parameters {name: tensor} (flowfactory.train.state.named_trainable)")
        super().__init__(params, dtype=torch.float32)
        self.decay = decay

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        for n, p in self._match(params).items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        super().load_state_dict(state)
