"""A hub id's pipeline is loaded from its cached snapshot folder with the text encoders deferred; the hub id and
revision name the base and enter the conditioning fingerprint (offline: `download` is replaced by the folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline

from flowfactory.plugins import load
from flowfactory.registry import BuildContext
from flowfactory_flux.tiny import build_tiny_pipeline

OPTIONS = {"dtype": "float32", "height": 16, "width": 16, "max_sequence_length": 16}


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("snapshot")
    build_tiny_pipeline(0).save_pretrained(folder)
    return folder


def test_hub_id_loads_its_snapshot_with_encoders_deferred(snapshot: Path, monkeypatch: pytest.MonkeyPatch):
    asked: list[tuple[str, str | None]] = []

    def download(name: str, **kwargs: object) -> str:
        asked.append((name, kwargs.get("revision")))  # type: ignore[arg-type]
        return str(snapshot)

    monkeypatch.setattr(FluxPipeline, "download", download)
    spec = load(strict=True).registry.get("policy", "flux")
    policy = spec.create({"model": "someone/flux-test", **OPTIONS}, BuildContext(seed=0))
    other = spec.create({"model": "someone/flux-test", "revision": "v2", **OPTIONS}, BuildContext(seed=0))
    assert asked == [("someone/flux-test", None), ("someone/flux-test", "v2")]
    assert policy.pipe.config._name_or_path == "someone/flux-test"  # the base named in saves is the hub id
    assert policy.source.folder == snapshot.resolve() and policy.source.revision is None
    assert set(policy.source.deferred) == {"text_encoder", "text_encoder_2"}
    assert policy.text_encoder_modules() == {}
    assert policy.conditioning_fingerprint() != other.conditioning_fingerprint()  # the revision counts
    cond = policy.encode(["a red square"])
    assert set(policy.text_encoder_modules()) == {"text_encoder", "text_encoder_2"}
    assert policy.source.deferred == {}
    preset = spec.create({"preset": "tiny", **OPTIONS}, BuildContext(seed=0)).encode(["a red square"])
    assert all(torch.equal(cond[k], preset[k]) for k in preset)
