"""Fixtures every plugin's tests share: per-sample generators and a stand-in for a training step."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


@pytest.fixture
def gens() -> Callable[..., list[torch.Generator]]:
    """gens(n, offset=0): one seeded generator per sample."""
    return lambda n, offset=0: [torch.Generator().manual_seed(offset + i) for i in range(n)]


@pytest.fixture
def perturb() -> Callable[..., None]:
    """perturb(params, seed, scale=0.05): add seeded Gaussian noise in place (stands in for training); the
    diffusers suite's own helper, so plugin tests and the suite move weights the same way."""
    from flowfactory_diffusers.testing import perturb as perturb_

    return perturb_
