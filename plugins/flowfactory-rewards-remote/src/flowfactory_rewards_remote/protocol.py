"""The wire format of `ff reward serve` (docs/reward-server.md), shared by the server and the `remote` client.

A POST /score body is a safetensors file (content type `application/x-safetensors`): one uint8 tensor, `images`
[B, H, W, C] or `videos` [B, T, H, W, C], and in the file's `__metadata__` one entry, `request`, a JSON string
{"protocol": 1, "prompts": [...B], "group_ids": [...B], "metadata": [...B objects], "reward": NAME}. Parsing it
reads a JSON header and copies raw bytes: nothing in it can run code.

The body may also carry the rows' input images (an edit's source): one uint8 [H, W, 3] tensor per distinct image,
named `input.<n>`, and in the request `"inputs": [...B lists of those names]`, each row's images in its record's
order. A body without them is the protocol-1 body it always was; a server that takes them says `"inputs": true`
in its GET /rewards record.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PROTOCOL = 1
CONTENT_TYPE = "application/x-safetensors"
META_KEY = "request"
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a header larger than this is refused before it is parsed
INPUT_PREFIX = "input."  # tensors of input images are named input.0, input.1, ...
MAX_INPUT_IMAGES = 1024  # distinct input images per request (each becomes a file on the server)


class BadRequest(ValueError):
    """The body cannot be read (400) or does not fit the schema (422): `status` says which."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class ScoreRequest:
    """A decoded POST /score body: exactly one of `images` [B, H, W, C] / `videos` [B, T, H, W, C] (uint8);
    `input_images` the distinct input images by tensor name (uint8 [H, W, 3]), `inputs` each row's names, in
    order (empty lists when the body carries none)."""

    prompts: list[str]
    images: np.ndarray | None = None
    videos: np.ndarray | None = None
    group_ids: list[int] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    reward: str | None = None
    inputs: list[list[str]] = field(default_factory=list)
    input_images: dict[str, np.ndarray] = field(default_factory=dict)


def encode(prompts: list[str], *, images: np.ndarray | None = None, videos: np.ndarray | None = None,
           group_ids: list[int] | None = None, metadata: list[dict[str, Any]] | None = None,
           reward: str | None = None, inputs: list[list[str]] | None = None,
           input_images: dict[str, np.ndarray] | None = None) -> bytes:
    """A POST /score body. `images` uint8 [B, H, W, C] or `videos` uint8 [B, T, H, W, C]; `metadata` must be
    JSON (a TypeError names what is not). `input_images`: distinct input images by name (`input.<n>`, uint8
    [H, W, 3]), `inputs`: each row's names, in order; both or neither."""
    from safetensors.numpy import save

    if (images is None) == (videos is None):
        raise ValueError("give exactly one of images and videos")
    if (inputs is None) != (input_images is None):
        raise ValueError("give both inputs and input_images, or neither")
    name, arr = ("images", images) if images is not None else ("videos", videos)
    request: dict[str, Any] = {"protocol": PROTOCOL, "prompts": list(prompts)}
    if group_ids is not None:
        request["group_ids"] = [int(g) for g in group_ids]
    if metadata:
        request["metadata"] = list(metadata)
    if reward is not None:
        request["reward"] = reward
    tensors = {name: np.ascontiguousarray(arr, dtype=np.uint8)}
    if inputs is not None and input_images is not None:
        for key in input_images:
            if not key.startswith(INPUT_PREFIX):
                raise ValueError(f"input image tensor {key!r} must be named {INPUT_PREFIX}<n>")
        missing = sorted({n for row in inputs for n in row} - set(input_images))
        if missing:
            raise ValueError(f"inputs name {missing}, which input_images does not hold")
        request["inputs"] = [list(row) for row in inputs]
        tensors.update({k: np.ascontiguousarray(v, dtype=np.uint8) for k, v in input_images.items()})
    return save(tensors, metadata={META_KEY: json.dumps(request)})


def _header(body: bytes) -> dict[str, Any]:
    if len(body) < 8:
        raise BadRequest(f"the body is {len(body)} bytes; a safetensors file starts with an 8-byte header length")
    (n,) = struct.unpack("<Q", body[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(body):
        raise BadRequest(f"the safetensors header length {n} does not fit in the {len(body)}-byte body")
    try:
        header = json.loads(body[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BadRequest("the safetensors header must be a JSON object")
    return header


def decode(body: bytes) -> ScoreRequest:
    """Parse and check a POST /score body; BadRequest (400: unreadable, 422: wrong content) says what is wrong."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    header = _header(body)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or META_KEY not in meta:
        raise BadRequest(f"the safetensors __metadata__ has no {META_KEY!r} entry (a JSON string with the prompts)",
                         422)
    try:
        tensors = load(body)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise BadRequest(f"the body is not a valid safetensors file: {exc}") from None
    try:
        request = json.loads(meta[META_KEY])
    except (TypeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"__metadata__[{META_KEY!r}] is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise BadRequest(f"__metadata__[{META_KEY!r}] must be a JSON object", 422)
    protocol = request.get("protocol", PROTOCOL)
    if protocol != PROTOCOL:
        raise BadRequest(f"protocol {protocol!r} is not served here; this server speaks protocol {PROTOCOL}", 422)

    input_images = {k: v for k, v in tensors.items() if k.startswith(INPUT_PREFIX)}
    media = {k: v for k, v in tensors.items() if k not in input_images}
    unknown = sorted(set(media) - {"images", "videos"})
    if unknown or len(media) != 1:
        raise BadRequest(f"the body must hold exactly one tensor `images` or `videos`, and input images named "
                         f"{INPUT_PREFIX}<n>; it holds {sorted(tensors)}", 422)
    name, arr = next(iter(media.items()))
    ndim = 4 if name == "images" else 5
    if arr.dtype != np.uint8:
        raise BadRequest(f"`{name}` must be uint8; got {arr.dtype}", 422)
    if arr.ndim != ndim or arr.shape[-1] not in (1, 3, 4) or 0 in arr.shape:
        layout = "[B, H, W, C]" if name == "images" else "[B, T, H, W, C]"
        raise BadRequest(f"`{name}` must be {layout} with C in 1, 3, 4 and no empty dimension; got shape "
                         f"{list(arr.shape)}", 422)
    b = arr.shape[0]

    prompts = request.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or len(prompts) != b:
        raise BadRequest(f"`prompts` must be a list of {b} strings, one per {name[:-1]}", 422)
    group_ids = request.get("group_ids", list(range(b)))
    if (not isinstance(group_ids, list) or len(group_ids) != b
            or not all(isinstance(g, int) and not isinstance(g, bool) for g in group_ids)):
        raise BadRequest(f"`group_ids` must be a list of {b} integers", 422)
    metadata = request.get("metadata", [{} for _ in range(b)])
    if not isinstance(metadata, list) or len(metadata) != b or not all(isinstance(m, dict) for m in metadata):
        raise BadRequest(f"`metadata` must be a list of {b} JSON objects", 422)
    reward = request.get("reward")
    if reward is not None and not isinstance(reward, str):
        raise BadRequest("`reward` must be a string", 422)
    inputs = _inputs(request, input_images, b)
    return ScoreRequest(prompts=prompts, group_ids=group_ids, metadata=metadata, reward=reward, inputs=inputs,
                        input_images=input_images, **{name: arr})


def _inputs(request: dict[str, Any], input_images: dict[str, np.ndarray], b: int) -> list[list[str]]:
    """Each row's input image names from `request.inputs`, checked against the body's `input.<n>` tensors."""
    if "inputs" not in request:
        if input_images:
            raise BadRequest(f"the body holds input images {_names(input_images)} but the request has no `inputs` "
                             "(each row's list of input tensor names)", 422)
        return [[] for _ in range(b)]
    inputs = request["inputs"]
    if (not isinstance(inputs, list) or len(inputs) != b
            or not all(isinstance(row, list) and all(isinstance(n, str) for n in row) for row in inputs)):
        raise BadRequest(f"`inputs` must be a list of {b} lists of input tensor names, one list per row", 422)
    if len(input_images) > MAX_INPUT_IMAGES:
        raise BadRequest(f"the body holds {len(input_images)} input images; this server takes at most "
                         f"{MAX_INPUT_IMAGES} per request (send fewer rows per request)", 422)
    for key, arr in input_images.items():
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3 or 0 in arr.shape:
            raise BadRequest(f"input image `{key}` must be uint8 [H, W, 3] (RGB, as Prompt.load_images gives it); "
                             f"got {arr.dtype} with shape {list(arr.shape)}", 422)
    for row, names in enumerate(inputs):
        missing = [n for n in names if n not in input_images]
        if missing:
            raise BadRequest(f"`inputs[{row}]` names {missing[0]!r}, which the body does not hold (its input "
                             f"images: {_names(input_images) or 'none'})", 422)
    unused = sorted(set(input_images) - {n for names in inputs for n in names})
    if unused:
        raise BadRequest(f"input image `{unused[0]}` is named by no row of `inputs`", 422)
    return inputs


def _names(input_images: dict[str, np.ndarray]) -> str:
    shown = sorted(input_images)
    return ", ".join(shown[:8]) + (f", ... ({len(shown)} in all)" if len(shown) > 8 else "")
