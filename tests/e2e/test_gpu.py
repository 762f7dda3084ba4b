"""What only a GPU can show: the tiny FLUX quickstart in bf16 on CUDA. Skipped without CUDA."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_flux_grpo_in_bf16_on_cuda(tmp_path):
    from flowfactory.config import validate
    from flowfactory.train import run

    cfg, options = validate({
        "name": "gpu", "seed": 0,
        "policy": {"name": "flux", "options": {"preset": "tiny", "lora": {"rank": 8}}},
        "sampler": {"name": "flow-sde", "options": {"steps": 6}},
        "rewards": [{"name": "brightness"}],
        "optimizer": {"name": "grpo", "options": {"clip_range": 1e-4}},
        "train": {"epochs": 3, "prompts_per_epoch": 2, "group_size": 4, "mixed_precision": "bf16",
                  "eval_every": 0, "sample_every": 0, "checkpoint_every": 0},
    }, "<gpu test>")
    summary = run(cfg, options, output_dir=str(tmp_path / "out"), show_progress=False)
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert summary.epochs == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (tmp_path / "out" / "final" / "pytorch_lora_weights.safetensors").is_file()
