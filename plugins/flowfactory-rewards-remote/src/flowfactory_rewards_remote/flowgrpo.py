"""The `flow-grpo-remote` reward: a client of Flow-GRPO's reward servers (its DeQA, GenEval and UnifiedReward
servers), so runs can keep the scorers already deployed for it.

Their protocol: POST to the server's URL a pickled dict of plain values, {"images": [JPEG bytes, ...]} plus
"prompts" (UnifiedReward) or "meta_datas" and "only_strict" (GenEval); the answer is a pickled dict whose
"outputs" (DeQA, UnifiedReward) or "scores" (GenEval) holds one number per image, or on a failure status 500 and
the server's traceback as text.

Sending is `pickle.dumps` of plain containers only. The answer is never unpickled with `pickle.loads`: it is read
by `safe_loads`, whose unpickler refuses every global (so no class, function or `__reduce__` payload can be
built, let alone called) and every persistent id; what it returns is plain dicts, lists, tuples, strings, bytes,
numbers, booleans and None, and is then checked for the expected shape.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from typing import Any

import torch

from flowfactory.errors import RewardError
from flowfactory.types import Samples
from flowfactory_rewards_remote import FlowGRPORemoteOptions
from flowfactory_rewards_remote.http import Client
from flowfactory_rewards_remote.remote import quantise

DEFAULT_SCORE_KEY = {"deqa": "outputs", "unifiedreward": "outputs", "geneval": "scores"}
PLAIN = (dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float, bool, type(None))


class RefusedPickle(pickle.UnpicklingError):
    """The data asked for something other than plain values: a class, a function, a persistent id."""


class PlainUnpickler(pickle.Unpickler):
    """Reads pickles of plain values only. Building any object other than a container, string, bytes or number
    goes through `find_class` (GLOBAL, STACK_GLOBAL, and the copyreg extension codes EXT1/2/4 alike), which
    always refuses here; a persistent id is refused too. REDUCE, NEWOBJ, INST and OBJ need such a callable on the
    stack, so they can never run."""

    def find_class(self, module: str, name: str) -> Any:
        raise RefusedPickle(f"refused to load {module}.{name}: only plain values (dicts, lists, strings, numbers) "
                            "are read from a reward server's answer")

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle("refused a persistent id: only plain values are read from a reward server's answer")


def safe_loads(data: bytes) -> Any:
    """The plain value pickled in `data`; RefusedPickle for anything that would build another object."""
    return PlainUnpickler(io.BytesIO(data)).load()


def plain_dumps(value: Any) -> bytes:
    """pickle.dumps of a value made of plain types only (checked, so no object of ours ever goes out)."""
    def check(v: Any, where: str) -> None:
        if not isinstance(v, PLAIN):
            raise TypeError(f"{where} is a {type(v).__name__}; only plain values are sent")
        if isinstance(v, dict):
            for k, x in v.items():
                check(k, f"{where} key")
                check(x, f"{where}[{k!r}]")
        elif isinstance(v, (list, tuple, set, frozenset)):
            for i, x in enumerate(v):
                check(x, f"{where}[{i}]")

    check(value, "the request")
    return pickle.dumps(value, protocol=4)


def jpeg_bytes(image_hwc: Any, quality: int) -> bytes:
    from PIL import Image

    arr = image_hwc[..., 0] if image_hwc.shape[-1] == 1 else image_hwc[..., :3]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class FlowGRPORemote:
    groupwise = False
    handles_video = False

    def __init__(self, options: FlowGRPORemoteOptions):
        self.options = options
        self.score_key = options.score_key or DEFAULT_SCORE_KEY[options.server]
        self.client = Client(what=f"flow-grpo-remote ({options.server})", timeout=options.timeout,
                             retries=options.retries, backoff=options.backoff, max_concurrency=options.max_concurrency,
                             max_reply_bytes=int(options.max_reply_mb * 2**20),
                             hint=f"Check that Flow-GRPO's {options.server} server is running at {options.url}, or "
                                  "raise the option timeout or retries")

    def request(self, samples: Samples, rows: list[int], images: Any) -> dict[str, Any]:
        o = self.options
        data: dict[str, Any] = {"images": [jpeg_bytes(images[r], o.jpeg_quality) for r in rows]}
        if o.server == "unifiedreward":
            data["prompts"] = [samples.prompts[r] for r in rows]
        elif o.server == "geneval":
            if len(samples.metadata) != len(samples) or not all(samples.metadata[r] for r in rows):
                raise RewardError("flow-grpo-remote (geneval): GenEval scores each image against its prompt's "
                                  "metadata (tag, include, exclude, ...), and these samples carry none. Give the "
                                  "prompts their GenEval metadata, or use another reward.")
            try:  # JSON round trip: only plain values go out
                data["meta_datas"] = json.loads(json.dumps([samples.metadata[r] for r in rows]))
            except (TypeError, ValueError) as exc:
                raise RewardError(f"flow-grpo-remote (geneval): a sample's metadata is not plain JSON: {exc}") from None
            data["only_strict"] = bool(o.only_strict)
        return data

    def _post(self, payload: dict[str, Any]) -> list[float]:
        o, n = self.options, len(payload["images"])
        resp = self.client.request("POST", o.url, data=plain_dumps(payload),
                                   headers={"Content-Type": "application/octet-stream"})
        try:
            reply = safe_loads(resp.content)
        except RefusedPickle as exc:
            raise RewardError(f"flow-grpo-remote: the answer of {o.url} was refused: {exc}. A Flow-GRPO server "
                              "answers a dict of lists of numbers; check what runs at that URL.") from None
        except Exception as exc:  # truncated or not a pickle at all
            raise RewardError(f"flow-grpo-remote: the answer of {o.url} is not a readable pickle "
                              f"({type(exc).__name__}: {exc}); first bytes {resp.content[:60]!r}") from None
        if not isinstance(reply, dict) or self.score_key not in reply:
            keys = sorted(map(str, reply)) if isinstance(reply, dict) else type(reply).__name__
            raise RewardError(f"flow-grpo-remote: the answer of {o.url} has no {self.score_key!r} (option score_key); "
                              f"it holds {keys}")
        scores = reply[self.score_key]
        if (not isinstance(scores, (list, tuple)) or len(scores) != n
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores)):
            raise RewardError(f"flow-grpo-remote: {self.score_key!r} in the answer of {o.url} must be {n} finite "
                              f"numbers, one per image; got {str(scores)[:200]}")
        return [float(s) for s in scores]

    def score(self, samples: Samples) -> torch.Tensor:
        if samples.images is None:
            raise RewardError("flow-grpo-remote scores images; got samples without images")
        images = quantise(samples.images)
        n, size = len(samples), self.options.batch_size
        chunks = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
        payloads = [self.request(samples, rows, images) for rows in chunks]
        results = self.client.map(self._post, payloads)
        return torch.tensor([s for part in results for s in part], dtype=torch.float32)
