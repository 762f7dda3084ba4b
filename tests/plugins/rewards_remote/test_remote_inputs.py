"""The rows' prompt records on the wire: `remote` sends each distinct input image once, the server rebuilds every
row's record on exactly those pixels, and a served `edit-colour` (a real `ff reward serve` process) scores as the
local one does; bodies with bad inputs get 422 naming what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save
from test_reward_server import grid_images, post

from flowfactory.errors import RewardError
from flowfactory.prompts import Prompt
from flowfactory.registry import BuildContext
from flowfactory.rewards.builtin import EditColour
from flowfactory.types import Samples
from flowfactory_rewards_remote.protocol import decode, encode
from flowfactory_rewards_remote.server import records as server_records

GROUP = 3


def write_sources(folder: Path) -> dict[str, Path]:
    """Source images of several kinds: a 16x16 RGB PNG, the same bytes under another name (one content digest), a
    JPEG (its decoded pixels travel, not the file), and a 32x32 greyscale PNG (read as RGB, area-resized to the
    samples' size by edit-colour on either side)."""
    rng = np.random.default_rng(0)
    paths = {"a": folder / "a.png", "a-copy": folder / "a-copy.png", "b": folder / "b.jpg", "c": folder / "c.png"}
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(paths["a"])
    shutil.copyfile(paths["a"], paths["a-copy"])
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(paths["b"], quality=80)
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(paths["c"])
    return paths


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    return write_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module")
def edits(sources) -> list[Prompt]:
    """Editing records: colours given as a name, "#rrggbb", [r, g, b] or only in the text; regions that make the
    keep term read the source; one record with two input images."""
    square = [0.25, 0.25, 0.75, 0.75]
    return [Prompt("make the square red", images=[sources["a"]], metadata={"colour": "red", "region": square}),
            Prompt("make the left half blue", images=[sources["b"]],
                   metadata={"colour": "#0000ff", "region": [0, 0, 0.5, 1]}),
            Prompt("make the top green", images=[sources["c"]], metadata={"colour": [0, 1, 0], "region": [0, 0, 1, 0.5]}),
            Prompt("make the square yellow", images=[sources["a-copy"]], metadata={"region": square}),
            Prompt("paint the square white", images=[sources["b"], sources["a"]], metadata={"region": square})]


def batch(edits: list[Prompt], seed: int = 1) -> Samples:
    """Each record GROUP times in a row (a group), with images on the uint8 grid."""
    rows = [r for r in edits for _ in range(GROUP)]
    return Samples.of(rows, group_ids=[i // GROUP for i in range(len(rows))],
                      images=grid_images(len(rows), seed=seed))


def remote(registry, server, **options):
    return registry.get("reward", "remote").create({"url": server.url, "reward": "edit-colour", **options},
                                                   BuildContext())


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def leftovers(server) -> list[str]:
    return sorted(p.name for p in server.tmp.iterdir() if p.name.startswith("ff-reward-inputs-"))


def test_served_edit_colour_equals_the_local_one(registry, edit_server, edits):
    reward = remote(registry, edit_server, batch_size=4, max_concurrency=2)  # 15 rows: 4 requests, 2 in flight
    assert reward.served["inputs"] is True
    samples = batch(edits)
    scores = reward.score(samples)
    expected = EditColour(tolerance=0.5).score(samples)
    print(f"edit-colour via remote with input images: max diff {float((scores - expected).abs().max()):.3g}")
    assert torch.equal(scores, expected)
    # Not vacuous: the keep term, which reads each source, moves every score whose record has a region.
    colour_only = EditColour(tolerance=0.5, keep_weight=0).score(samples)
    assert bool((expected != colour_only).all())
    assert leftovers(edit_server) == []  # each request's folder of input images is gone


def test_each_distinct_input_image_travels_once_and_comes_back_as_its_pixels(registry, edit_server, edits, sources,
                                                                             tmp_path):
    reward = remote(registry, edit_server)
    samples = batch(edits)
    req = decode(reward.request_body(samples, list(range(len(samples)))))
    # a.png and a-copy.png hold the same bytes (one digest): three distinct images for 15 rows
    assert sorted(req.input_images) == ["input.0", "input.1", "input.2"]
    assert req.inputs == [["input.0"]] * 3 + [["input.1"]] * 3 + [["input.2"]] * 3 + [["input.0"]] * 3 + [
        ["input.1", "input.0"]] * 3
    for name, source in (("input.0", "a"), ("input.1", "b"), ("input.2", "c")):
        assert np.array_equal(req.input_images[name], pixels(sources[source]))  # decoded JPEG, grey as RGB
    assert req.metadata == [dict(r.metadata) for r in samples.inputs]
    rebuilt = server_records(req, tmp_path)
    for mine, theirs in zip(samples.inputs, rebuilt, strict=True):
        assert (theirs.text, theirs.metadata) == (mine.text, mine.metadata)
        got, want = theirs.load_images(), mine.load_images()
        assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))
    # A request holds only its own rows' images, renumbered from input.0.
    part = decode(reward.request_body(samples, [3, 4, 12]))
    assert part.inputs == [["input.0"], ["input.0"], ["input.0", "input.1"]]
    assert np.array_equal(part.input_images["input.0"], pixels(sources["b"]))


def test_text_only_records_make_the_body_they_always_made(registry, edit_server):
    samples = Samples.of(["a red square", "a blue square"], group_ids=[0, 1], images=grid_images(2))
    body = remote(registry, edit_server).request_body(samples, [0, 1])
    wire = (samples.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert body == encode(samples.prompts, images=wire, group_ids=[0, 1], metadata=[{}, {}], reward="edit-colour")
    assert decode(body).inputs == [[], []]


def test_a_server_without_inputs_or_send_inputs_false(registry, edit_server, edits):
    samples = batch(edits[:2])
    old = remote(registry, edit_server)
    old.served = {**old.served, "inputs": False}  # what an older server's GET /rewards says (no `inputs`)
    with pytest.raises(RewardError, match=r"the server at .* takes none .* or set send_inputs: false"):
        old.score(samples)
    bare = remote(registry, edit_server, send_inputs=False, retries=0)
    assert decode(bare.request_body(samples, [0, 1])).input_images == {}
    with pytest.raises(RewardError, match=r"HTTP 500: RewardError: edit-colour: the prompt 'make the square red' has "
                                          r"no input image"):
        bare.score(samples)  # edit-colour reads the source, which was not sent
    assert leftovers(edit_server) == []  # removed after a failed call too


def _body(case: str) -> bytes:
    """A body with two rows sharing one input image, spoilt as `case` says (any other case: well formed)."""
    images = np.zeros((2, 4, 4, 3), np.uint8)
    src = np.zeros((4, 4, 3), np.uint8)
    request = {"protocol": 1, "prompts": ["make it red", "make it red"], "metadata": [{"colour": "red"}] * 2}
    tensors, inputs = {"images": images, "input.0": src}, [["input.0"], ["input.0"]]
    if case == "float input":
        tensors["input.0"] = src.astype(np.float32)
    elif case == "grey input":
        tensors["input.0"] = src[..., 0]
    elif case == "missing tensor":
        inputs = [["input.0"], ["input.1"]]
    elif case == "unnamed tensor":
        tensors["input.1"] = src
    elif case == "no inputs list":
        inputs = None
    elif case == "inputs length":
        inputs = [["input.0"]]
    elif case == "other tensor":
        tensors["source.0"] = tensors.pop("input.0")
    if inputs is not None:
        request["inputs"] = inputs
    return save(tensors, metadata={"request": json.dumps(request)})


BAD = {
    "float input": "input image `input.0` must be uint8 [H, W, 3] (RGB, as Prompt.load_images gives it); got "
                   "float32 with shape [4, 4, 3]",
    "grey input": "input image `input.0` must be uint8 [H, W, 3] (RGB, as Prompt.load_images gives it); got uint8 "
                  "with shape [4, 4]",
    "missing tensor": "`inputs[1]` names 'input.1', which the body does not hold (its input images: input.0)",
    "unnamed tensor": "input image `input.1` is named by no row of `inputs`",
    "no inputs list": "the body holds input images input.0 but the request has no `inputs`",
    "inputs length": "`inputs` must be a list of 2 lists of input tensor names, one list per row",
    "other tensor": "input images named input.<n>; it holds ['images', 'source.0']",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_get_422_naming_what_is_wrong(case, edit_server):
    resp = post(edit_server, _body(case))
    assert resp.status_code == 422, resp.text
    assert BAD[case] in resp.json()["error"], resp.json()
    assert post(edit_server, _body("good")).status_code == 200  # the same body, well formed


def test_the_size_limit_counts_the_input_images(edit_server):
    small = np.zeros((2, 4, 4, 3), np.uint8)
    body = encode(["make it red"] * 2, images=small, inputs=[["input.0"], ["input.0"]],
                  input_images={"input.0": np.zeros((600, 600, 3), np.uint8)})  # 1.03 MiB > 1 MiB
    resp = post(edit_server, body)
    assert resp.status_code == 413 and "--max-request-mb" in resp.json()["error"], resp.text
