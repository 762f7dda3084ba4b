"""The real stack end to end: tiny FLUX + flow-sde + grpo through `ff run`, reward rising."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from flowfactory.plugins import load
from flowfactory_cli.main import create_app

ROOT = Path(__file__).resolve().parents[2]


def test_flux_grpo_learns_colour_match_through_ff_run(tmp_path):
    """A short version of the quickstart, on red prompts only (the fastest signal): reward rises and
    sampling/training log-probs agree."""
    cfg = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    (tmp_path / "red.txt").write_text("a red square\na red circle\na red car\na red house\n")
    (tmp_path / "red-eval.txt").write_text("a red ball\n")
    cfg["data"] = {"train": "red.txt", "eval": "red-eval.txt"}
    cfg["train"].update(epochs=16, eval_every=8, eval_prompts=1, sample_every=8, checkpoint_every=8)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    result = CliRunner().invoke(create_app(load(strict=True)), ["run", str(path), "--output", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward/mean"] for r in rows]
    assert len(rewards) == 16
    assert sum(rewards[-4:]) / 4 > 1.3 * sum(rewards[:4]) / 4, rewards
    assert max(r["logprob/agreement"] for r in rows) < 1e-5
    assert rows[-1]["eval/reward/mean"] > rows[7]["eval/reward/mean"] > 0
    final = out / "final"
    assert (final / "transformer" / "config.json").is_file()  # full finetune: diffusers transformer folder
    assert (out / "samples" / "train-000016.png").is_file()
