"""Fixtures for the wan policy tests: build through the registry, and tiny pipelines saved to disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from wan_frames import write_frames

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


# --- image-to-video (wan-i2v) --------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """`write_frames` in a session folder."""
    return write_frames(tmp_path_factory.mktemp("wan-i2v-frames"))


@pytest.fixture(scope="session")
def i2v_spec() -> ComponentSpec:
    return load(strict=True).registry.get("policy", "wan-i2v")


@pytest.fixture
def make_i2v(i2v_spec: ComponentSpec) -> Callable[..., Any]:
    """make_i2v(seed=0, **options) -> WanI2VPolicy; options default to the tiny preset."""

    def make(seed: int = 0, **options: Any) -> Any:
        if "model" not in options:
            options.setdefault("preset", "tiny")
        return i2v_spec.create(options, BuildContext(seed=seed))

    return make


@pytest.fixture(scope="session")
def tiny_i2v_dirs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """tiny_i2v_dirs(kind) -> a saved seed-0 tiny WanImageToVideoPipeline folder, built once per kind: "2.1" (CLIP,
    one expert), "flf" (Wan 2.1 FLF2V's two-image position embedding), "2.2" (two experts, no image encoder)."""
    from flowfactory_wan.tiny import build_tiny_i2v_pipeline

    kinds = {"2.1": {}, "flf": {"first_last": True}, "2.2": {"experts": 2}}
    saved: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in saved:
            saved[kind] = tmp_path_factory.mktemp(f"tiny-wan-i2v-{kind}")
            build_tiny_i2v_pipeline(0, **kinds[kind]).save_pretrained(saved[kind])
        return saved[kind]

    return get


README = Path(__file__).resolve().parents[3] / "plugins" / "flowfactory-wan" / "README.md"


@pytest.fixture(scope="session")
def check_wan_readme() -> Callable[[Any, str], None]:
    """check(registry, component): the package README documents both policies. Every ```yaml block is a config of
    `wan` or `wan-i2v` that validates against that policy's options, `component` has at least two of them, and
    the option tables' keys are exactly the options' (the two policies share their option names)."""
    import re

    import yaml

    def check(registry: Any, component: str) -> None:
        text = README.read_text()
        names = []
        for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S):
            policy = yaml.safe_load(block)["policy"]
            assert policy["name"] in ("wan", "wan-i2v"), policy["name"]
            registry.get("policy", policy["name"]).options.model_validate(policy["options"])
            names.append(policy["name"])
        assert names.count(component) >= 2, names
        model = registry.get("policy", component).options
        from flowfactory_wan import WanLoraOptions as lora
        rows = set(re.findall(r"^\| `([\w.]+)`(?:, `([\w.]+)`)? \|", text, flags=re.M))
        documented = {key for row in rows for key in row if key}
        assert documented == set(model.model_fields) | {f"lora.{k}" for k in lora.model_fields}

    return check
