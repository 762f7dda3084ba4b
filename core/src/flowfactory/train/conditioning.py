"""The frozen conditioning of prompt records: encoded once per distinct record and reused across epochs, in a
bounded device-side LRU and, optionally, in an on-disk cache shared by the processes of a run and by later runs.

Rows are keyed by the record's `key` (`flowfactory.prompts.Prompt.key`: the text of a text-only prompt, the text
and the input images' content digests otherwise), so two edits with the same instruction and different source
images never share a row. On disk each record is one safetensors file (never a pickle) named by
sha256(fingerprint, key),
where the fingerprint is the policy's `conditioning_fingerprint()`: a hash of everything that decides the
encoder output (model, revision, encoder files or weights, dtype, options such as the sequence length or the
negative prompt). A changed option therefore makes new keys and never reads an old entry. Files are written
under a temporary name in their own folder and renamed with `os.replace`, which is atomic: processes of one run,
and concurrent runs, may share the folder; two writers of a key write the same conditioning. Reads load only
the rows asked for, straight to the device, and the LRU stays within `capacity` prompts, so host memory never
holds the prompt set.
"""

from __future__ import annotations

import hashlib
import os
import uuid
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from flowfactory.errors import FlowFactoryError
from flowfactory.prompts import Prompt, as_prompts
from flowfactory.types import Conditioning, select_rows

FORMAT = "flowfactory-conditioning/1"  # the files' metadata "format"; another value is not read


class ConditioningCache:
    """Frozen text conditioning per prompt: device-side LRU of `capacity` prompts, backed by `directory`
    (one safetensors file per prompt) when given and the policy has a `conditioning_fingerprint()`.

    Calling it with prompts returns their conditioning rows, batch-first, in order; only prompts found neither
    in memory nor on disk are encoded, in one `policy.encode` call. Counters (`encode_calls`, `encoded`,
    `memory_hits`, `disk_hits`, `disk_writes`) say where rows came from."""

    def __init__(self, policy: Any, capacity: int = 512, directory: str | os.PathLike[str] | None = None):
        if capacity < 1:
            raise ValueError(f"ConditioningCache: capacity must be >= 1, got {capacity}")
        self.policy = policy
        self.capacity = capacity
        self.rows: OrderedDict[str, Conditioning] = OrderedDict()  # record key -> its row
        self.encode_calls = self.encoded = self.memory_hits = self.disk_hits = self.disk_writes = 0
        self.directory: Path | None = None
        self.fingerprint: str | None = None
        if directory is not None:
            self._open(Path(directory))

    def _open(self, directory: Path) -> None:
        """Use `directory` if the policy can fingerprint its encoders (else warn: memory only)."""
        make = getattr(self.policy, "conditioning_fingerprint", None)
        fingerprint = make() if callable(make) else None
        if fingerprint is None:
            warnings.warn(f"train.conditioning_cache={str(directory)!r}: policy {type(self.policy).__name__} gives no "
                          f"conditioning_fingerprint(), so its encodings cannot be keyed on disk; caching in memory "
                          f"only", stacklevel=3)
            return
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FlowFactoryError(f"train.conditioning_cache={str(directory)!r}: cannot create the folder ({exc}); "
                                   f"give a writable folder or null (memory only)") from exc
        self.directory, self.fingerprint = directory, str(fingerprint)

    def key(self, prompt: str | Prompt) -> str:
        """The record's on-disk key: sha256 of the policy's fingerprint and the record's key."""
        if self.fingerprint is None:
            raise RuntimeError("ConditioningCache.key: no on-disk cache (no directory or no fingerprint)")
        return hashlib.sha256(f"{self.fingerprint}\n{_key(prompt)}".encode()).hexdigest()

    def path(self, prompt: str | Prompt) -> Path:
        """directory/<first two hex digits of the key>/<key>.safetensors"""
        key = self.key(prompt)
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.safetensors"

    def __call__(self, prompts: list[str | Prompt]) -> Conditioning:
        if not prompts:
            raise ValueError("ConditioningCache: no prompts")
        records = as_prompts(prompts)
        keys = [r.key for r in records]
        distinct = dict(zip(keys, records, strict=True))  # first record of each key, in order
        missing = []
        for k, r in distinct.items():
            if k in self.rows:
                self.memory_hits += 1
            elif (row := self._read(r)) is not None:
                self.rows[k] = row
                self.disk_hits += 1
            else:
                missing.append(r)
        if missing:
            with torch.no_grad():
                enc = self.policy.encode(missing)
            self.encode_calls += 1
            self.encoded += len(missing)
            for i, r in enumerate(missing):
                self.rows[r.key] = select_rows(enc, slice(i, i + 1))
                self._write(r, self.rows[r.key])
        for k in distinct:
            self.rows.move_to_end(k)
        out = {name: torch.cat([self.rows[k][name] for k in keys]) for name in self.rows[keys[0]]}
        while len(self.rows) > max(self.capacity, len(distinct)):
            self.rows.popitem(last=False)
        return out

    def _device(self) -> str:
        return str(getattr(self.policy, "device", "cpu"))

    def _read(self, prompt: str | Prompt) -> Conditioning | None:
        """The prompt's row from disk, on the policy's device; None when absent, unreadable or not this
        prompt's (a damaged file is re-encoded and rewritten)."""
        if self.directory is None:
            return None
        from safetensors import SafetensorError, safe_open

        path = self.path(prompt)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device=self._device()) as f:
                meta = f.metadata() or {}
                if (meta.get("format"), meta.get("fingerprint"), meta.get("prompt")) != (
                        FORMAT, self.fingerprint, _key(prompt)):
                    return None
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (OSError, SafetensorError):
            return None

    def _write(self, prompt: str | Prompt, row: Conditioning) -> None:
        """Write the row to a temporary file beside its final name, then `os.replace` it there (atomic)."""
        if self.directory is None:
            return
        from safetensors.torch import save_file

        path = self.path(prompt)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            path.parent.mkdir(exist_ok=True)
            tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in row.items()}
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "fingerprint": str(self.fingerprint),
                                                   "prompt": _key(prompt)})
            os.replace(tmp, path)
            self.disk_writes += 1
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            warnings.warn(f"train.conditioning_cache={str(self.directory)!r}: cannot write {path.name} ({exc}); "
                          f"caching in memory only from now on (free space or give another folder)", stacklevel=3)
            self.directory = None


def _key(prompt: str | Prompt) -> str:
    return prompt.key if isinstance(prompt, Prompt) else prompt
