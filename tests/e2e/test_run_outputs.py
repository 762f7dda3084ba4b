"""What a toy run leaves to look at: curves.png, provenance.json, and the same rows, config and sample grids in
Weights & Biases (offline mode, read back from the run's .wandb file with wandb's own protobuf records)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from flowfactory.config import load
from flowfactory.train import run
from flowfactory.train.logging import CURVES_DPI, PANEL_SIZE

wandb = pytest.importorskip("wandb", reason="wandb is the optional extra flowfactory[wandb] (in requirements.txt)")

TRAIN = {"epochs": 4, "eval_every": 2, "sample_every": 2, "checkpoint_every": 2}


def wandb_records(path: Path) -> list[Any]:
    """The records of a .wandb file: a 7-byte header (":W&B", magic, version), then leveldb-log framed records
    (32 KiB blocks; each chunk: crc32, length, type FULL/FIRST/MIDDLE/LAST) of wandb_internal.Record protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, records, buf = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        size, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + size], pos + 7 + size
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
    return records


def history(records: list[Any]) -> dict[int, dict[str, Any]]:
    """{step: {key: value}} of the logged rows (several records of one step merged)."""
    out: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            out.setdefault(int(items["_step"]), {}).update(items)
    return out


def test_toy_run_with_wandb_offline_leaves_curves_provenance_and_wandb(toy_registry, toy_config, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    path = toy_config(train={**TRAIN, "wandb": {"enabled": True, "project": "ff-test", "mode": "offline",
                                                "tags": ["toy", "ci"]}})
    out = tmp_path / "run"
    cfg, options = load(path)
    run(cfg, options, output_dir=str(out), show_progress=False)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]

    # curves.png: two panels (combined reward, brightness), drawn at the end
    with Image.open(out / "curves.png") as img:
        assert img.format == "PNG"
        assert img.size == (2 * round(PANEL_SIZE[0] * CURVES_DPI), round(PANEL_SIZE[1] * CURVES_DPI))

    # provenance.json: the config as config.json holds it, packages, libraries, devices
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["config"] == json.loads((out / "config.json").read_text())
    assert prov["packages"]["flowfactory"] == "0.1.0" and "flowfactory-grpo" in prov["packages"]
    assert prov["devices"]["processes"] == 1 and prov["devices"]["device"] == "cpu"
    assert prov["libraries"]["torch"] and prov["libraries"]["accelerate"]

    # W&B: one offline run under WANDB_DIR, its id kept in the run folder
    run_id = json.loads((out / "wandb.json").read_text())["id"]
    files = list((tmp_path / "wandb-dir" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1
    records = wandb_records(files[0])
    started = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert started[0].project == "ff-test" and list(started[0].tags) == ["toy", "ci"]
    config = {i.key: json.loads(i.value_json) for i in started[0].config.update}
    assert config["train"]["epochs"] == 4 and config["policy"] == {"name": "toy", "options": {"size": 8}}
    steps = history(records)
    assert sorted(steps) == [1, 2, 3, 4]
    for row in rows:
        logged = steps[row["epoch"]]
        for key, value in row.items():
            assert logged[key] == pytest.approx(value), key
    for epoch in (2, 4):  # the sample grids, as images, at the epochs they were drawn
        for kind in ("train", "eval"):
            assert steps[epoch][f"samples/{kind}/_type"] == "image-file"
            assert steps[epoch][f"samples/{kind}/caption"] == f"{kind} samples, epoch {epoch}"
            assert (files[0].parent / "files" / steps[epoch][f"samples/{kind}/path"]).is_file()
    assert "samples/train/_type" not in steps[1]


def test_a_resumed_run_continues_its_wandb_run(toy_registry, toy_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wb = {"enabled": True, "mode": "offline"}
    out = tmp_path / "run"
    cfg, options = load(toy_config(train={**TRAIN, "epochs": 2, "wandb": wb}))
    run(cfg, options, output_dir=str(out), show_progress=False)
    first = json.loads((out / "wandb.json").read_text())["id"]
    # wandb names an offline run's folder offline-run-<start, to the second>-<id>: a resume starting in the same
    # second as the first run (a quiet machine runs 2 toy epochs in well under one) would write into its folder
    time.sleep(1.1)
    cfg, options = load(toy_config(train={**TRAIN, "wandb": {**wb, "tags": ["resumed"]}}))  # W&B keys may change
    run(cfg, options, output_dir=str(out), resume=True, show_progress=False)
    assert json.loads((out / "wandb.json").read_text())["id"] == first
    files = sorted((tmp_path / "wandb").glob(f"offline-run-*-{first}/run-{first}.wandb"))
    steps: dict[int, dict[str, Any]] = {}
    for f in files:
        steps.update(history(wandb_records(f)))
    assert sorted(steps) == [1, 2, 3, 4]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["config"]["train"]["epochs"] == 2 and [r["from_epoch"] for r in prov["resumes"]] == [2]
