"""Fixtures for the z-image policy tests: build through the registry, and a tiny pipeline saved to disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flowfactory.plugins import load
from flowfactory.registry import BuildContext, ComponentSpec


@pytest.fixture(scope="session")
def zimage_spec() -> ComponentSpec:
    return load(strict=True).registry.get("policy", "z-image")


@pytest.fixture
def make_policy(zimage_spec: ComponentSpec) -> Callable[..., Any]:
    """make_policy(seed=0, **options) -> ZImagePolicy; options default to the tiny preset."""

    def make(seed: int = 0, **options: Any) -> Any:
        if "model" not in options:
            options.setdefault("preset", "tiny")
        return zimage_spec.create(options, BuildContext(seed=seed))

    return make


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset's seed-0 pipeline, written with ZImagePipeline.save_pretrained."""
    from flowfactory_zimage.tiny import build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-z-image")
    build_tiny_pipeline(0).save_pretrained(path)
    return path
