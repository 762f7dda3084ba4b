"""Keyed randomness: every draw of a run is seeded from (run seed, integer keys), never from a running RNG.

A sample's noise therefore depends only on its key (epoch, sample index, ...), not on which process or batch
it lands in, so 1 process equals N processes and a resumed run equals an uninterrupted one. Policies,
samplers and algorithms import these helpers; none of them needs the training loop.
"""

from __future__ import annotations

import numpy as np
import torch


def sample_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed mixed from the run seed and integer keys (epoch, sample index, ...)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def generators(seed: int, keys: list[tuple[int, ...]]) -> list[torch.Generator]:
    """One CPU generator per key, seeded by `sample_seed(seed, *key)`."""
    return [torch.Generator().manual_seed(sample_seed(seed, *k)) for k in keys]


def randn_per_sample(shape: tuple[int, ...], generators: list[torch.Generator], device=None,
                     dtype=torch.float32) -> torch.Tensor:
    """Standard normal [len(generators), *shape], each row from its own generator.

    Rows depend only on their generator, so a sample draws the same noise whatever batch or process
    it lands in.
    """
    rows = [torch.randn(shape, generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device=device, dtype=dtype)
