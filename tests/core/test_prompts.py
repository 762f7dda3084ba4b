"""The prompt record: .jsonl with image paths and metadata, keys, errors that name the file, line and path, the
conditioning cache keyed by record, and records reaching the rewards through a real run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowfactory.errors import FlowFactoryError
from flowfactory.prompts import Prompt, as_prompts, texts
from flowfactory.train.conditioning import ConditioningCache
from flowfactory.train.data import load_prompts
from flowfactory.types import Samples


def _png(path: Path, rgb: tuple[int, int, int], size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), rgb, dtype=np.uint8)).save(path)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_records_resolve_images_against_the_file_and_keep_every_other_field(tmp_path: Path) -> None:
    red = _png(tmp_path / "data" / "src" / "red.png", (255, 0, 0))
    blue = _png(tmp_path / "data" / "src" / "blue.png", (0, 0, 255))
    _png(tmp_path / "data" / "out" / "t.png", (0, 255, 0))
    f = _jsonl(tmp_path / "data" / "edits.jsonl", [
        {"prompt": "make it green", "image": "src/red.png", "target": "out/t.png", "colour": "green", "n": 2},
        {"prompt": "a pair", "images": ["src/red.png", str(blue)]},
        {"prompt": "text only", "tag": "single_object", "include": [{"class": "cat", "count": 1}]},
    ])
    recs = load_prompts(str(f.relative_to(tmp_path)), tmp_path, "data.train")
    assert [r.text for r in recs] == ["make it green", "a pair", "text only"]
    assert recs[0].images == (red.resolve(),)
    assert recs[0].targets == {"target": (tmp_path / "data" / "out" / "t.png").resolve()}
    assert recs[0].metadata == {"colour": "green", "n": 2}
    assert recs[1].images == (red.resolve(), blue.resolve())
    assert recs[2].metadata == {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    imgs = recs[1].load_images()
    assert [tuple(i.shape) for i in imgs] == [(3, 8, 8), (3, 8, 8)]
    assert imgs[0].dtype == torch.float32
    assert torch.equal(imgs[0][:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(imgs[1][:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.equal(recs[0].load_target("target")[:, 3, 3], torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(KeyError, match="has no 'chosen' image"):
        recs[0].load_target("chosen")


def test_keys_follow_text_and_image_content_not_paths(tmp_path: Path) -> None:
    a = _png(tmp_path / "a.png", (10, 20, 30))
    b = _png(tmp_path / "b.png", (200, 20, 30))
    a_copy = _png(tmp_path / "elsewhere" / "renamed.png", (10, 20, 30))
    assert Prompt("cat").key == "cat"  # a text prompt's key is the prompt: old conditioning caches stay valid
    ka, kb, kc = (Prompt("make it blue", images=[p]).key for p in (a, b, a_copy))
    assert ka != kb  # same instruction, different sources: different conditioning
    assert ka == kc  # same bytes under another name: same key
    assert ka == "make it blue\n[image sha256:" + hashlib.sha256(a.read_bytes()).hexdigest() + "]"
    assert Prompt("x", images=[a, b]).key != Prompt("x", images=[b, a]).key  # order matters
    assert Prompt("cat", metadata={"tag": 1}).key == "cat"  # metadata does not change the conditioning
    assert texts(["p", Prompt("q")]) == ["p", "q"]
    assert [r.text for r in as_prompts(["p", Prompt("q")])] == ["p", "q"]
    rec = Prompt("edit", images=[a], metadata={"k": [1]})
    assert Prompt.from_json(json.loads(json.dumps(rec.to_json()))) == rec


@pytest.mark.parametrize(("line", "message"), [
    ({"prompt": "x", "image": "missing.png"}, r"edits\.jsonl:2: image 'missing.png' \(.*missing\.png\): no such file; "
                                              r"paths are relative to edits\.jsonl's folder"),
    ({"prompt": "x", "image": "bad.png"}, r"edits\.jsonl:2: image 'bad.png' .*not a readable image"),
    ({"prompt": "x", "chosen": "missing.png"}, r"edits\.jsonl:2: chosen 'missing.png' .*no such file"),
    ({"prompt": "x", "image": "a.png", "images": ["a.png"]}, r":2: give either 'image' \(one path\) or 'images'"),
    ({"prompt": "x", "images": "a.png"}, r":2: 'images' must be a list of paths"),
    ({"text": "x"}, r":2: each line must be a JSON object with a 'prompt' string"),
])
def test_bad_lines_name_the_file_the_line_and_the_path(tmp_path: Path, line: dict, message: str) -> None:
    _png(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    f = _jsonl(tmp_path / "edits.jsonl", [{"prompt": "fine", "image": "a.png"}, line])
    with pytest.raises(FlowFactoryError, match=message) as info:
        load_prompts(str(f), None, "data.train")
    assert str(info.value).startswith(f"data.train: {f}:2: ")


def test_ff_validate_refuses_a_missing_image(tmp_path: Path) -> None:
    import yaml

    from flowfactory import config as ff_config
    from flowfactory.errors import ConfigError

    _jsonl(tmp_path / "edits.jsonl", [{"prompt": "x", "image": "gone.png"}])
    data = yaml.safe_load((Path(__file__).parents[2] / "examples" / "quickstart.yaml").read_text())
    data["data"] = {"train": "edits.jsonl"}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        ff_config.load(cfg)
    assert "data.train" in str(info.value) and "edits.jsonl:1: image 'gone.png'" in str(info.value)
    assert "no such file" in str(info.value)


class _Counting:
    """Encodes the text and the mean colour of the first input image; records every call."""

    device = "cpu"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
        self.calls.append([p.key for p in prompts])
        rows = [torch.cat([torch.tensor([float(len(p.text))]),
                           p.load_images()[0].mean((1, 2)) if p.images else torch.zeros(3)]) for p in prompts]
        return {"c": torch.stack(rows)}

    def conditioning_fingerprint(self) -> str:
        return "counting"


def test_the_cache_keys_by_record_so_edits_with_one_instruction_never_collide(tmp_path: Path) -> None:
    red, blue = _png(tmp_path / "r.png", (255, 0, 0)), _png(tmp_path / "b.png", (0, 0, 255))
    e_red, e_blue = Prompt("make it green", images=[red]), Prompt("make it green", images=[blue])
    policy = _Counting()
    cache = ConditioningCache(policy, capacity=8, directory=tmp_path / "cache")
    out = cache([e_red, e_blue, e_red])
    assert len(policy.calls) == 1 and len(policy.calls[0]) == 2  # two distinct records, one call
    assert torch.equal(out["c"][0], torch.tensor([13.0, 1.0, 0.0, 0.0]))
    assert torch.equal(out["c"][1], torch.tensor([13.0, 0.0, 0.0, 1.0]))
    assert torch.equal(out["c"][2], out["c"][0])
    again = ConditioningCache(_Counting(), capacity=8, directory=tmp_path / "cache")  # a later run: from disk
    assert torch.equal(again([e_blue, e_red])["c"], out["c"][[1, 0]])
    assert again.disk_hits == 2 and again.encode_calls == 0


def test_samples_of_records_carry_texts_inputs_and_metadata(tmp_path: Path) -> None:
    src = _png(tmp_path / "s.png", (0, 255, 0))
    recs = [Prompt("a", images=[src], metadata={"colour": "red"}), Prompt("b")]
    s = Samples.of(recs + ["c"], group_ids=[0, 1, 2], images=torch.zeros(3, 3, 4, 4))
    assert s.prompts == ["a", "b", "c"] and s.group_ids == [0, 1, 2]
    assert s.metadata == [{"colour": "red"}, {}, {}]
    assert s.inputs[0] is recs[0] and s.inputs[2].text == "c"
    assert torch.equal(s.inputs[0].load_images()[0][:, 0, 0], torch.tensor([0.0, 1.0, 0.0]))
