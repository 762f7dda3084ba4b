"""Fixtures for the wan policy tests: build through the registry, and tiny pipelines saved to disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

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
