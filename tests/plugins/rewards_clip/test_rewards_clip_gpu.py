"""What only a GPU shows: each CLIP reward on CUDA (BuildContext.device) in half precision. Skipped without CUDA."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from flowfactory.types import Samples

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["pickscore", "pickscore-rank", "clip-score", "aesthetic", "hpsv2"])
def test_reward_on_cuda_in_half_precision(tiny: Any, name: str, dtype: str) -> None:
    from flowfactory.plugins import load
    from flowfactory.registry import BuildContext

    spec = load(strict=True).registry.get("reward", name)
    cpu = spec.create(tiny.options(name), BuildContext())
    gpu = spec.create({**tiny.options(name), "dtype": dtype}, BuildContext(device=torch.device("cuda")))
    model = gpu.embedder.model
    assert next(model.parameters()).device.type == "cuda" and next(model.parameters()).dtype == getattr(torch, dtype)
    images = torch.rand(6, 3, 40, 30, generator=torch.Generator().manual_seed(0))
    prompts = ["a red square", "a red square", "a blue circle", "a blue circle", "a cat", "a cat"]
    samples = Samples(prompts=prompts, images=images, group_ids=[0, 0, 1, 1, 2, 2])
    on_device = Samples(prompts=prompts, images=images.cuda(), group_ids=[0, 0, 1, 1, 2, 2])
    expected, got = cpu.score(samples), gpu.score(on_device)
    assert got.dtype == torch.float32 and got.shape == (6,) and torch.isfinite(got).all()
    if name == "pickscore-rank":  # ranks may swap where half precision moves close scores past each other
        assert set(got.tolist()) <= {0.0, 0.5, 1.0}
    else:
        assert (got.cpu() - expected).abs().max() <= 0.05 * expected.abs().max() + 1e-3
