"""The benchmark scripts keep running: benchmarks/rollout.py for every policy, at the smallest size.

Timings are not asserted (noisy machines); what is asserted is what the script reports besides them: our
rollout's images equal the stock pipeline's, and the report names the pipeline it measured against.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("policy, pipeline", [
    ("flux", "FluxPipeline"),
    ("sd3", "StableDiffusion3Pipeline"),
    ("qwen-image", "QwenImagePipeline"),
    ("wan", "WanPipeline"),
])
def test_rollout_benchmark_runs_and_matches_the_stock_pipeline(policy: str, pipeline: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "rollout.py"), "--policy", policy, "--steps", "2", "--batch", "2",
         "--repeats", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"pipeline ({pipeline}.__call__" in out
    assert re.search(r"ratio ours / pipeline: \d+\.\d{3}", out)
    diff = re.search(r"max abs image difference: (\S+)", out)
    assert diff is not None and float(diff.group(1)) < 1e-4, out
    assert "torchvision" not in result.stderr  # the pipelines' import warnings stay quiet


def test_memory_benchmark_halves_a_full_finetune_without_reference() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    ratios = dict(re.findall(r"^(flux|sd3|qwen-image|wan)\s+\S+ MB\s+\S+ MB\s+(\d\.\d{3})$", result.stdout, flags=re.M))
    assert ratios == {"flux": "0.500", "sd3": "0.500", "qwen-image": "0.500", "wan": "0.500"}, result.stdout
    assert "FLUX.1-dev transformer: 11.90B parameters" in result.stdout
