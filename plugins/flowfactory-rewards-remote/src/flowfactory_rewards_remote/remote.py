"""The `remote` reward: scores through an `ff reward serve` server (docs/reward-server.md).

Images travel as uint8, quantised as a PNG would store them (round(x * 255) of the image clamped to [0, 1]);
the server scores x = uint8 / 255. Scores come back float32, exactly: JSON carries every digit of a float32.
The rows' prompt records travel too: text, metadata, and their input images (an edit's source) as the uint8
pixels `Prompt.load_images()` reads, each distinct image (by content digest) once per request.
`groupwise` and `handles_video` are what the server says its reward is (read from GET /rewards when the run
starts): a groupwise reward gets whole groups in each request.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from flowfactory.errors import FlowFactoryError, RewardError
from flowfactory.prompts import Prompt
from flowfactory.types import Samples
from flowfactory_rewards_remote import RemoteOptions
from flowfactory_rewards_remote.http import Client, bearer_headers
from flowfactory_rewards_remote.protocol import CONTENT_TYPE, PROTOCOL, encode


def quantise(x: torch.Tensor) -> np.ndarray:
    """[..., C, H, W] in [0, 1] -> uint8 [..., H, W, C], as a PNG stores it: round(clamp(x, 0, 1) * 255)."""
    q = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return q.movedim(-3, -1).contiguous().numpy()


def input_tensors(records: list[Prompt], rows: list[int]) -> tuple[dict[str, np.ndarray], list[list[str]]]:
    """The input images of the rows' records as uint8 [H, W, 3] tensors named input.0, input.1, ..., one per
    distinct image (by content digest: the rows of a group share their record), and each row's names in order."""
    by_digest: dict[str, str] = {}
    tensors: dict[str, np.ndarray] = {}
    names: list[list[str]] = []
    for r in rows:
        record, loaded = records[r], None
        for j, digest in enumerate(record.digests):
            if digest not in by_digest:
                loaded = loaded if loaded is not None else record.load_images()
                by_digest[digest] = name = f"input.{len(by_digest)}"
                tensors[name] = quantise(loaded[j])  # k / 255 floats: back to exactly k
        names.append([by_digest[d] for d in record.digests])
    return tensors, names


def plan_requests(n: int, group_ids: list[int], batch_size: int, groupwise: bool) -> list[list[int]]:
    """Rows of each request. Pointwise: consecutive runs of batch_size rows. Groupwise: whole groups (rows with
    one group id, in order of first appearance), packed while they fit in batch_size; a group larger than
    batch_size goes alone, whole."""
    if not groupwise:
        return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    ids = group_ids if len(group_ids) == n else list(range(n))
    groups: dict[int, list[int]] = {}
    for row, g in enumerate(ids):
        groups.setdefault(int(g), []).append(row)
    chunks: list[list[int]] = []
    current: list[int] = []
    for rows in groups.values():
        if current and len(current) + len(rows) > batch_size:
            chunks.append(current)
            current = []
        current = current + rows
    if current:
        chunks.append(current)
    return chunks


class RemoteReward:
    """Client of one `ff reward serve` server; build it with `build_remote` (it reads what the server serves)."""

    groupwise = False
    handles_video = False

    def __init__(self, options: RemoteOptions, served: dict[str, Any], client: Client):
        self.options = options
        self.served = served
        self.client = client
        self.url = f"{options.url}/score"

    def _records(self, samples: Samples) -> list[Prompt] | None:
        return samples.inputs if len(samples.inputs) == len(samples) else None

    def request_body(self, samples: Samples, rows: list[int]) -> bytes:
        """The POST /score body for `rows` of `samples`: their images or videos, prompts, group ids, metadata and
        (with send_inputs) their records' input images."""
        media = ({"images": quantise(samples.images[rows])} if samples.images is not None
                 else {"videos": quantise(samples.videos[rows])})
        records = self._records(samples)
        metadata = (samples.metadata if samples.metadata else
                    [dict(r.metadata) for r in records] if records and any(r.metadata for r in records) else None)
        inputs: dict[str, Any] = {}
        if records is not None and self.options.send_inputs and any(records[r].images for r in rows):
            input_images, names = input_tensors(records, rows)
            inputs = {"input_images": input_images, "inputs": names}
        return encode([samples.prompts[r] for r in rows],
                      group_ids=[int(samples.group_ids[r]) for r in rows] if samples.group_ids else None,
                      metadata=[metadata[r] for r in rows] if metadata else None,
                      reward=self.options.reward, **media, **inputs)

    def _post(self, samples: Samples, rows: list[int]) -> list[float]:
        body = self.request_body(samples, rows)
        resp = self.client.request("POST", self.url, data=body, headers={"Content-Type": CONTENT_TYPE})
        try:
            scores = resp.json()["scores"]
        except (ValueError, KeyError, TypeError):
            raise RewardError(f"remote reward {self.options.reward!r}: POST {self.url} answered without a `scores` "
                              f"list: {resp.text[:300]!r}. Is that an `ff reward serve` server?") from None
        if (not isinstance(scores, list) or len(scores) != len(rows)
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)):
            got = len(scores) if isinstance(scores, list) else type(scores).__name__
            raise RewardError(f"remote reward {self.options.reward!r}: POST {self.url} answered {got} scores for "
                              f"{len(rows)} samples")
        return [float(s) for s in scores]

    def score(self, samples: Samples) -> torch.Tensor:
        if samples.images is None and samples.videos is None:
            raise RewardError(f"remote reward {self.options.reward!r}: the samples hold neither images nor videos")
        if samples.videos is not None and not self.handles_video:
            raise RewardError(f"remote reward {self.options.reward!r} does not handle videos; the core scores a "
                              "video's frames as images")
        records = self._records(samples)
        if (self.options.send_inputs and not self.served.get("inputs") and records is not None
                and any(r.images for r in records)):
            raise RewardError(f"remote reward {self.options.reward!r}: these samples' prompt records have input "
                              f"images, but the server at {self.options.url} takes none (its "
                              "flowfactory-rewards-remote predates input images). Install the same "
                              "flowfactory-rewards-remote on both sides, or set send_inputs: false if "
                              f"{self.options.reward!r} never reads them")
        n = len(samples)
        chunks = plan_requests(n, list(samples.group_ids), self.options.batch_size, self.groupwise)
        results = self.client.map(lambda rows: self._post(samples, rows), chunks)
        out = torch.empty(n, dtype=torch.float32)
        for rows, scores in zip(chunks, results):
            out[rows] = torch.tensor(scores, dtype=torch.float32)
        return out


def build_remote(options: RemoteOptions) -> RemoteReward:
    """Ask the server what it serves (GET /rewards), check it is `options.reward`, and build the client with the
    served reward's `groupwise` and `handles_video`. A wrong name or an unreachable server fails here, when the
    run starts (never at `ff validate`)."""
    headers = bearer_headers(options.token_env, (
        f"remote reward {options.reward!r}: option token_env names the environment variable {options.token_env}, "
        f"which is not set or is empty. Export the server's token (export {options.token_env}=...) before `ff run`."))
    client = Client(what=f"remote reward {options.reward!r}", timeout=options.timeout, retries=options.retries,
                    backoff=options.backoff, max_concurrency=options.max_concurrency, headers=headers,
                    hint=f"Check that the server is running (ff reward serve --reward {options.reward} ...) and "
                         "reachable, or raise the option timeout or retries")
    try:
        listing = client.request("GET", f"{options.url}/rewards", at_start=True).json()
    except ValueError:
        raise FlowFactoryError(f"remote reward {options.reward!r}: GET {options.url}/rewards did not answer JSON; "
                               "is option url an `ff reward serve` server?") from None
    if not isinstance(listing, dict) or listing.get("protocol") != PROTOCOL:
        got = listing.get("protocol") if isinstance(listing, dict) else None
        raise FlowFactoryError(f"remote reward {options.reward!r}: the server at {options.url} speaks protocol {got!r}; "
                               f"this client speaks {PROTOCOL}. Install the same flowfactory-rewards-remote on both sides.")
    served = {r.get("name"): r for r in listing.get("rewards", []) if isinstance(r, dict)}
    if options.reward not in served:
        names = ", ".join(repr(n) for n in served) or "nothing"
        raise FlowFactoryError(f"remote reward: the server at {options.url} serves {names}, not {options.reward!r} "
                               f"(option reward). Set reward to the served name, or start a server for "
                               f"{options.reward!r}: ff reward serve --reward {options.reward}")
    record = served[options.reward]
    cls = type("RemoteReward", (RemoteReward,), {"groupwise": bool(record.get("groupwise")),
                                                  "handles_video": bool(record.get("handles_video")),
                                                  "__module__": __name__})
    return cls(options, record, client)
