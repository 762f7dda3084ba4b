"""train.conditioning_cache end to end: a second tiny-FLUX run over the same prompts and cache folder never
calls the text encoders and gives the same rewards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flowfactory.plugins import load
from flowfactory_cli.main import create_app

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_second_run_makes_no_encoder_call_and_the_same_rewards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from flowfactory_flux.policy import FluxPolicy

    calls: list[list[str]] = []
    encode = FluxPolicy.encode

    def counting(self: FluxPolicy, prompts: list[str]):  # every encode of either run, with its prompts
        calls.append(list(prompts))
        return encode(self, prompts)

    monkeypatch.setattr(FluxPolicy, "encode", counting)
    cfg = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    cfg["train"].update(epochs=2, prompts_per_epoch=2, group_size=2, micro_batch_size=4, rollout_batch_size=4,
                        eval_every=2, eval_prompts=2, sample_every=0, checkpoint_every=0,
                        conditioning_cache="cache")  # relative: beside the config
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    app = create_app(load(strict=True))
    rows = []
    for name in ("first", "second"):
        before = len(calls)
        result = CliRunner().invoke(app, ["run", str(path), "--output", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        rows.append([json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
        if name == "first":
            first_calls = calls[before:]
    assert first_calls, "the first run encoded nothing: the cache was not empty"
    encoded = {p for c in first_calls for p in c}
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == len(encoded)
    assert calls[len(first_calls):] == []  # the second run: zero encoder calls
    assert len(rows[0]) == len(rows[1]) == 2 and "eval/reward/mean" in rows[0][-1]
    for a, b in zip(*rows, strict=True):
        keys = [k for k in a if k.startswith(("reward/", "eval/reward/")) or k == "loss"]
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}  # identical, not close
