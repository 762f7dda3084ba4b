"""Fixtures for the flux2 and flux2-klein policy tests: build through the registry, tiny pipelines saved to disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flowfactory.registry import BuildContext, Registry
from flowfactory.testing.contracts import load_registry


@pytest.fixture(scope="session")
def flux2_registry() -> Registry:
    """The installed plugins' registry, loaded leniently (another package's broken plugin is not ours to fail on)."""
    return load_registry()


def _maker(registry: Registry, name: str) -> Callable[..., Any]:
    def make(seed: int = 0, **options: Any) -> Any:
        if "model" not in options:
            options.setdefault("preset", "tiny")
        return registry.get("policy", name).create(options, BuildContext(seed=seed))

    return make


@pytest.fixture
def make_flux2(flux2_registry: Registry) -> Callable[..., Any]:
    """make_flux2(seed=0, **options) -> Flux2Policy; options default to the tiny preset."""
    return _maker(flux2_registry, "flux2")


@pytest.fixture
def make_klein(flux2_registry: Registry) -> Callable[..., Any]:
    """make_klein(seed=0, **options) -> Flux2KleinPolicy; options default to the tiny preset."""
    return _maker(flux2_registry, "flux2-klein")


@pytest.fixture(scope="session")
def flux2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The flux2 tiny preset's seed-0 pipeline, written with Flux2Pipeline.save_pretrained."""
    from flowfactory_flux2.tiny import build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-flux2")
    build_tiny_pipeline(0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def klein_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The flux2-klein tiny preset's seed-0 pipeline, written with Flux2KleinPipeline.save_pretrained."""
    from flowfactory_flux2.tiny import build_tiny_klein_pipeline

    path = tmp_path_factory.mktemp("tiny-flux2-klein")
    build_tiny_klein_pipeline(0).save_pretrained(path)
    return path
