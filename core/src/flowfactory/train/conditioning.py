"""The frozen text conditioning of prompts, encoded once per distinct prompt and reused across epochs."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from flowfactory.types import Conditioning, select_rows


class ConditioningCache:
    """Frozen text conditioning per prompt, encoded once and kept on the device (LRU-bounded)."""

    def __init__(self, policy: Any, capacity: int = 512):
        self.policy = policy
        self.capacity = capacity
        self.rows: OrderedDict[str, Conditioning] = OrderedDict()

    def __call__(self, prompts: list[str]) -> Conditioning:
        missing = list(dict.fromkeys(p for p in prompts if p not in self.rows))
        if missing:
            with torch.no_grad():
                enc = self.policy.encode(missing)
            for i, p in enumerate(missing):
                self.rows[p] = select_rows(enc, slice(i, i + 1))
        for p in prompts:
            self.rows.move_to_end(p)
        out = {k: torch.cat([self.rows[p][k] for p in prompts]) for k in self.rows[prompts[0]]}
        while len(self.rows) > max(self.capacity, len(set(prompts))):
            self.rows.popitem(last=False)
        return out
