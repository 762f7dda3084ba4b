"""Fixtures for the qwen-image policy tests: build through the registry, and a tiny pipeline saved to disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flowfactory.plugins import load
from flowfactory.registry import BuildContext, ComponentSpec


@pytest.fixture(scope="session")
def qwen_spec() -> ComponentSpec:
    return load(strict=True).registry.get("policy", "qwen-image")


@pytest.fixture
def make_policy(qwen_spec: ComponentSpec) -> Callable[..., Any]:
    """make_policy(seed=0, **options) -> QwenImagePolicy; options default to the tiny preset."""

    def make(seed: int = 0, **options: Any) -> Any:
        if "model" not in options:
            options.setdefault("preset", "tiny")
        return qwen_spec.create(options, BuildContext(seed=seed))

    return make


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset's seed-0 pipeline, written with QwenImagePipeline.save_pretrained."""
    from flowfactory_qwen_image.tiny import build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-qwen-image")
    build_tiny_pipeline(0).save_pretrained(path)
    return path


@pytest.fixture
def stock() -> Callable[[Path, Any], Any]:
    """stock(folder, policy): QwenImagePipeline.from_pretrained(folder) with the prompt-prefix length the policy
    counted (the stock pipeline hard-codes 34, the real Qwen tokenizer's)."""
    from diffusers import QwenImagePipeline

    def load_(folder: Path, policy: Any) -> Any:
        pipe = QwenImagePipeline.from_pretrained(folder)
        pipe.prompt_template_encode_start_idx = policy.pipe.prompt_template_encode_start_idx
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return load_
