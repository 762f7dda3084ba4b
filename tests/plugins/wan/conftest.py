"""Fixtures for the wan policy tests: build through the registry, and tiny pipelines saved to disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from flowfactory.plugins import load
from flowfactory.registry import BuildContext, ComponentSpec


@pytest.fixture(scope="session")
def wan_spec() -> ComponentSpec:
    return load(strict=True).registry.get("policy", "wan")


@pytest.fixture
def make_policy(wan_spec: ComponentSpec) -> Callable[..., Any]:
    """make_policy(seed=0, **options) -> WanPolicy; options default to the tiny preset."""

    def make(seed: int = 0, **options: Any) -> Any:
        if "model" not in options:
            options.setdefault("preset", "tiny")
        return wan_spec.create(options, BuildContext(seed=seed))

    return make


def _saved(tmp_path_factory: pytest.TempPathFactory, experts: int) -> Path:
    from flowfactory_wan.tiny import build_tiny_pipeline

    path = tmp_path_factory.mktemp(f"tiny-wan-{experts}")
    build_tiny_pipeline(0, experts=experts).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset's seed-0 pipeline (one expert), written with WanPipeline.save_pretrained."""
    return _saved(tmp_path_factory, 1)


@pytest.fixture(scope="session")
def tiny2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset's seed-0 two-expert pipeline (boundary 0.875), written with save_pretrained."""
    return _saved(tmp_path_factory, 2)


@pytest.fixture
def gens() -> Callable[..., list[torch.Generator]]:
    """gens(n, offset=0): one seeded generator per sample."""
    return lambda n, offset=0: [torch.Generator().manual_seed(offset + i) for i in range(n)]


@pytest.fixture
def perturb() -> Callable[..., None]:
    """perturb(params, seed, scale=0.05): add seeded Gaussian noise in place (stands in for training)."""

    def perturb_(params: list[torch.nn.Parameter], seed: int, scale: float = 0.05) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in params:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))

    return perturb_
