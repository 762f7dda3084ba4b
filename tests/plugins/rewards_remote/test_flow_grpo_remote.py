"""`flow-grpo-remote` against a fake server speaking Flow-GRPO's protocol (remote_fakes.py, a real subprocess), and
the reader of its answers: plain values only, and a `__reduce__` payload is refused without running."""

from __future__ import annotations

import copyreg
import io
import pickle

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from test_reward_server import grid_images

from flowfactory.errors import RewardError
from flowfactory.registry import BuildContext
from flowfactory.types import Samples
from flowfactory_rewards_remote.flowgrpo import RefusedPickle, jpeg_bytes, plain_dumps, safe_loads
from flowfactory_rewards_remote.remote import quantise


def client(registry, url, **options):
    return registry.get("reward", "flow-grpo-remote").create({"url": url, **options}, BuildContext())


def jpeg_brightness(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """What the fake DeQA server computes, from the JPEGs the client sends."""
    out = []
    for arr in quantise(images):
        dec = np.asarray(Image.open(io.BytesIO(jpeg_bytes(arr, quality))).convert("RGB"), dtype=np.float64) / 255
        out.append(float((dec * np.array([0.299, 0.587, 0.114])).sum(-1).mean()))
    return torch.tensor(out, dtype=torch.float32)


def test_deqa_and_unifiedreward_requests(registry, flowgrpo_server):
    images = grid_images(5, seed=9)
    s = Samples(prompts=["a red car", "a blue car", "a red hat", "a cat", "red"], images=images)
    deqa = client(registry, flowgrpo_server.url, server="deqa", batch_size=2, max_concurrency=2)
    assert torch.equal(deqa.score(s), jpeg_brightness(images))
    unified = client(registry, flowgrpo_server.url + "/unifiedreward", server="unifiedreward", batch_size=3)
    assert torch.equal(unified.score(s), jpeg_brightness(images) * torch.tensor([1.0, 0, 1, 0, 1]))


def test_geneval_sends_each_samples_metadata(registry, flowgrpo_server):
    s = Samples(prompts=["a photo of a red cup"] * 3, images=grid_images(3),
                metadata=[{"tag": "colors", "score": v, "include": [{"class": "cup", "count": 1}]} for v in (0, .5, 1)])
    geneval = client(registry, flowgrpo_server.url + "/geneval", server="geneval")
    assert torch.equal(geneval.score(s), torch.tensor([0.0, 0.5, 1.0]))
    strict = client(registry, flowgrpo_server.url + "/geneval", server="geneval", score_key="strict_rewards")
    assert torch.equal(strict.score(s), torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(RewardError, match="these samples carry none"):
        geneval.score(Samples(prompts=["a cup"], images=grid_images(1)))


def test_a_reduce_payload_in_the_answer_is_refused_and_never_runs(registry, flowgrpo_server, tmp_path):
    marker = flowgrpo_server.marker
    evil = client(registry, flowgrpo_server.url + "/evil", server="deqa")
    with pytest.raises(RewardError, match=r"was refused: refused to load .*open: only plain values"):
        evil.score(Samples(prompts=["x"], images=grid_images(2)))
    assert not marker.exists()
    # The same answer is a live exploit for pickle.loads: proof that the refusal above is what kept it inert.
    raw = requests.post(flowgrpo_server.url + "/evil", data=plain_dumps({"images": [b""]}), timeout=10).content
    with pytest.raises(RefusedPickle):
        safe_loads(raw)
    assert not marker.exists()
    pickle.loads(raw)  # noqa: S301 - deliberately, on our own fake's bytes
    assert marker.exists()
    marker.unlink()


def test_numpy_values_and_failures_of_the_server(registry, flowgrpo_server):
    with pytest.raises(RewardError, match=r"refused to load numpy"):
        client(registry, flowgrpo_server.url + "/numpy", server="deqa").score(Samples(prompts=["x"], images=grid_images(1)))
    broken = client(registry, flowgrpo_server.url + "/broken", server="deqa", retries=1, backoff=0)
    with pytest.raises(RewardError, match=r"(?s)failed after 2 attempts: HTTP 500: Traceback.*KeyError: 'meta_datas'"):
        broken.score(Samples(prompts=["x"], images=grid_images(1)))


class _Ext:
    pass


def test_the_reader_takes_plain_values_only():
    value = {"outputs": [0.5, 1, -2.0], "n": None, "ok": True, "t": (1, "a"), "b": b"\x00", "s": {1, 2}}
    for protocol in range(4, pickle.HIGHEST_PROTOCOL + 1):  # what Python 3.8+ servers write by default
        assert safe_loads(pickle.dumps(value, protocol=protocol)) == value
    old = {k: v for k, v in value.items() if k not in ("b", "s")}  # protocols 0-3 build bytes, sets via a global
    for protocol in range(0, 4):
        assert safe_loads(pickle.dumps(old, protocol=protocol)) == old
    with pytest.raises(RefusedPickle, match="refused to load builtins.print"):
        safe_loads(pickle.dumps(print))
    copyreg.add_extension(__name__, "_Ext", 240)  # the EXT opcodes look classes up through find_class too
    try:
        data = pickle.dumps(_Ext, protocol=2)
        assert b"\x82" in data  # EXT1
        with pytest.raises(RefusedPickle, match="_Ext"):
            safe_loads(data)
    finally:
        copyreg.remove_extension(__name__, "_Ext", 240)
    with pytest.raises(pickle.UnpicklingError):
        safe_loads(b"\x80\x02P0\n.")  # a persistent id
    with pytest.raises(TypeError, match="only plain values are sent"):
        plain_dumps({"images": [np.zeros(2)]})
