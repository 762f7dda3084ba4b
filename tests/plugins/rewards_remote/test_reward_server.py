"""`ff reward serve` as a real subprocess (conftest.py): what it serves, scores equal to the local reward's, the
bearer token, the size limit, malformed bodies, a reward that raises, and the command's own errors."""

from __future__ import annotations

import json
import socket
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from remote_constants import TOKEN
from typer.testing import CliRunner

from flowfactory.rewards.builtin import Brightness, ColourMatch
from flowfactory.types import Samples
from flowfactory_cli.main import create_app
from flowfactory_rewards_remote.protocol import CONTENT_TYPE, encode

AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPTS = ["a red square", "a blue car", "a green field", "a yellow sun", "a red ball", "a blue ball"]


def grid_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Images already on the uint8 grid (k / 255): quantising them for the wire changes nothing."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8).float() / 255


def post(server, body: bytes, headers: dict | None = None, ctype: str = CONTENT_TYPE) -> requests.Response:
    return requests.post(server.url + "/score", data=body, headers={"Content-Type": ctype, **(headers or {})},
                         timeout=30)


def wire(images: torch.Tensor) -> np.ndarray:
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def test_health_and_what_is_served(colour_server):
    health = requests.get(colour_server.url + "/health", timeout=5)
    assert health.status_code == 200 and health.json() == {"status": "ok", "reward": "colour-match", "protocol": 1}
    assert requests.get(colour_server.url + "/rewards", timeout=5).status_code == 401
    listing = requests.get(colour_server.url + "/rewards", headers=AUTH, timeout=5).json()
    assert listing["protocol"] == 1
    (record,) = listing["rewards"]
    assert {k: record[k] for k in ("name", "options", "groupwise", "handles_video", "package", "device", "protocol")} == {
        "name": "colour-match", "options": {"tolerance": 0.5, "default": None}, "groupwise": False,
        "handles_video": False, "package": "flowfactory", "device": "cpu", "protocol": 1}
    assert "serving reward 'colour-match'" in colour_server.output()
    assert TOKEN not in colour_server.output()  # the token is never printed


@pytest.mark.parametrize("which", ["colour", "brightness"])
def test_scores_equal_the_local_reward_exactly_on_the_uint8_grid(which, colour_server, brightness_server):
    server, local, headers = ((colour_server, ColourMatch(tolerance=0.5), AUTH) if which == "colour"
                              else (brightness_server, Brightness(), {}))
    images = grid_images(len(PROMPTS), seed=3)
    resp = post(server, encode(PROMPTS, images=wire(images)), headers)
    assert resp.status_code == 200, resp.text
    remote = torch.tensor(resp.json()["scores"], dtype=torch.float32)
    expected = local.score(Samples(prompts=PROMPTS, images=images))
    print(f"{which}: max |server - local| on uint8-grid images = {float((remote - expected).abs().max()):.3g}")
    assert torch.equal(remote, expected)


def test_the_token_is_required_on_score(colour_server):
    body = encode(PROMPTS[:2], images=wire(grid_images(2)))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        resp = post(colour_server, body, headers)
        assert resp.status_code == 401, resp.text
        assert "bearer token" in resp.json()["error"] and resp.headers["WWW-Authenticate"] == "Bearer"
    assert post(colour_server, body, AUTH).status_code == 200


def test_requests_over_the_limit_get_413_and_the_server_goes_on(colour_server):
    big = encode(["a red square"] * 8, images=np.zeros((8, 256, 256, 3), np.uint8))  # 1.5 MiB > 1 MiB
    resp = post(colour_server, big, AUTH)
    assert resp.status_code == 413 and "--max-request-mb" in resp.json()["error"], resp.text
    chunked = post(colour_server, iter([big[i:i + 65536] for i in range(0, len(big), 65536)]), AUTH)  # no length
    assert chunked.status_code == 413, chunked.text
    assert post(colour_server, encode(PROMPTS[:1], images=wire(grid_images(1))), AUTH).status_code == 200


def _safetensors(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _good(n: int = 2) -> bytes:
    return encode(PROMPTS[:n], images=wire(grid_images(n)))


STATIC = {
    "not safetensors": b"hello",
    "header length past the end": struct.pack("<Q", 10**6) + b"{}",
    "header not JSON": struct.pack("<Q", 4) + b"{{{{",
    "no request entry": _safetensors({"images": {"dtype": "U8", "shape": [1, 1, 1, 3], "data_offsets": [0, 3]}}, b"abc"),
    "request not JSON": _safetensors({"__metadata__": {"request": "{nope"},
                                      "images": {"dtype": "U8", "shape": [1, 1, 1, 3], "data_offsets": [0, 3]}}, b"abc"),
    "offsets past the data": _safetensors({"__metadata__": {"request": json.dumps({"prompts": ["a red x"]})},
                                           "images": {"dtype": "U8", "shape": [1, 4, 4, 3], "data_offsets": [0, 48]}},
                                          b"abc"),
}
MALFORMED = {  # case: (status, a fragment of the message)
    "not safetensors": (400, "8-byte header length"),
    "header length past the end": (400, "does not fit"),
    "header not JSON": (400, "not JSON"),
    "no request entry": (422, "'request'"),
    "request not JSON": (400, "is not JSON"),
    "offsets past the data": (400, "not a valid safetensors"),
    "float images": (422, "must be uint8"),
    "wrong rank": (422, "[B, H, W, C]"),
    "prompt count": (422, "list of 2 strings"),
    "group ids": (422, "`group_ids` must be a list of 2 integers"),
    "another reward": (409, "serves reward 'colour-match'"),
    "wrong protocol": (422, "protocol 2"),
}


def _body(case: str) -> bytes:
    from safetensors.numpy import save

    meta = {"protocol": 1, "prompts": PROMPTS[:2]}
    if case == "float images":
        return save({"images": np.zeros((2, 4, 4, 3), np.float32)}, metadata={"request": json.dumps(meta)})
    if case == "wrong rank":
        return save({"images": np.zeros((2, 4, 3), np.uint8)}, metadata={"request": json.dumps(meta)})
    if case == "prompt count":
        return encode(PROMPTS[:3], images=np.zeros((2, 4, 4, 3), np.uint8))
    if case == "group ids":
        return save({"images": np.zeros((2, 4, 4, 3), np.uint8)},
                    metadata={"request": json.dumps({**meta, "group_ids": [0, "a"]})})
    if case == "another reward":
        return encode(PROMPTS[:2], images=np.zeros((2, 4, 4, 3), np.uint8), reward="brightness")
    if case == "wrong protocol":
        return save({"images": np.zeros((2, 4, 4, 3), np.uint8)}, metadata={"request": json.dumps({**meta, "protocol": 2})})
    return STATIC[case]


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_bodies_get_a_4xx_with_a_json_message_and_the_server_goes_on(case, colour_server):
    status, fragment = MALFORMED[case]
    resp = post(colour_server, _body(case), AUTH)
    assert resp.status_code == status, (case, resp.status_code, resp.text)
    assert fragment in resp.json()["error"], resp.json()
    assert post(colour_server, _good(), AUTH).status_code == 200


def test_wrong_content_type_and_unknown_paths(colour_server):
    resp = post(colour_server, _good(), AUTH, ctype="application/json")
    assert resp.status_code == 415 and CONTENT_TYPE in resp.json()["error"]
    assert requests.get(colour_server.url + "/nope", timeout=5).status_code == 404
    assert requests.get(colour_server.url + "/score", timeout=5).status_code == 405


def test_a_reward_that_raises_gives_500_with_its_message_and_the_server_goes_on(colour_server):
    resp = post(colour_server, encode(["a square", "a red square"], images=wire(grid_images(2))), AUTH)
    assert resp.status_code == 500
    assert resp.json() == {"error": resp.json()["error"], "reward": "colour-match"}
    assert "RewardError" in resp.json()["error"] and "'a square' names no colour" in resp.json()["error"]
    assert post(colour_server, _good(), AUTH).status_code == 200


def test_concurrent_requests_are_all_answered_correctly(colour_server):
    images = grid_images(24, seed=5)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(24)]
    bodies = [encode(prompts[i:i + 3], images=wire(images[i:i + 3])) for i in range(0, 24, 3)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: post(colour_server, b, AUTH), bodies))
    remote = torch.tensor([s for a in answers for s in a.json()["scores"]], dtype=torch.float32)
    assert torch.equal(remote, ColourMatch(tolerance=0.5).score(Samples(prompts=prompts, images=images)))


# --- the command's own errors, in-process (they stop before any server starts) -----------------------------

def _ff(*args: str, env: dict | None = None):
    return CliRunner().invoke(create_app(), ["reward", "serve", *args], env={"COLUMNS": "200", **(env or {})},
                              catch_exceptions=False)


def _user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stderr.count("Error:") == 1, result.stderr
    for fragment in fragments:
        assert fragment in " ".join(result.stderr.split()), (fragment, result.stderr)


def test_options_are_validated_by_the_rewards_own_model(tmp_path):
    _user_error(_ff("--reward", "colour-match", "--set", "tolerance=-1"),
                "reward 'colour-match' options", "option tolerance: Input should be greater than 0")
    _user_error(_ff("--reward", "colour-match", "--set", "tolerence=0.5"),
                "option tolerence: unknown option; `ff show reward colour-match` lists its options")
    options = tmp_path / "opts.yaml"
    options.write_text("tolerance: nope\n")
    _user_error(_ff("--reward", "colour-match", "--options-file", str(options)),
                f"({options})", "option tolerance: Input should be a valid number")
    _user_error(_ff("--reward", "colour-mach"), "no reward named 'colour-mach'", "Did you mean 'colour-match'?")


def test_a_missing_token_variable_or_a_busy_port_stops_at_start():
    _user_error(_ff("--reward", "brightness", "--token-env", "FF_TEST_UNSET_VAR", env={"FF_TEST_UNSET_VAR": ""}),
                "--token-env FF_TEST_UNSET_VAR: the environment variable FF_TEST_UNSET_VAR is not set")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        _user_error(_ff("--reward", "brightness", "--port", str(port)), f"cannot listen on 127.0.0.1:{port}",
                    "Choose another --port")
