"""ConditioningCache: the device LRU, and the on-disk cache keyed by the policy's fingerprint (toy policy)."""

from __future__ import annotations

import multiprocessing
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flowfactory.errors import FlowFactoryError
from flowfactory.prompts import texts
from flowfactory.testing.toy import ToyPolicy
from flowfactory.train.conditioning import FORMAT, ConditioningCache

PROMPTS = [f"prompt number {i}" for i in range(12)]


class Counting(ToyPolicy):
    """The toy policy, counting encode calls and the prompts they encode."""

    def __init__(self, seed: int = 0):
        super().__init__(seed=seed)
        self.calls: list[list[str]] = []

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        self.calls.append(texts(prompts))
        return super().encode(prompts)


class NoFingerprint(Counting):
    conditioning_fingerprint = None  # type: ignore[assignment]  # a policy that cannot be keyed on disk


def files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def test_memory_only_encodes_each_distinct_prompt_once_in_order():
    policy = Counting()
    cache = ConditioningCache(policy, capacity=8)
    batch = ["b", "a", "b", "c", "a"]
    out = cache(batch)
    assert policy.calls == [["b", "a", "c"]]
    torch.testing.assert_close(out["text"], policy.encode(batch)["text"], atol=0, rtol=0)
    cache(["c", "a"])
    assert len(policy.calls) == 2 and cache.encode_calls == 1 and cache.memory_hits == 2


def test_lru_is_bounded_by_capacity_but_serves_a_larger_batch():
    policy = Counting()
    cache = ConditioningCache(policy, capacity=3)
    cache(PROMPTS[:5])  # a batch wider than the capacity is served whole, then trimmed
    assert len(cache.rows) == 5
    cache(PROMPTS[5:6])
    assert list(cache.rows) == PROMPTS[3:6]
    cache(PROMPTS[:1])  # evicted: encoded again (no disk)
    assert policy.calls[-1] == PROMPTS[:1]


def test_second_cache_on_the_same_folder_makes_no_encoder_call(tmp_path: Path):
    first = Counting()
    cache = ConditioningCache(first, capacity=4, directory=tmp_path)
    expected = cache(PROMPTS)
    assert cache.encoded == len(PROMPTS) and cache.disk_writes == len(PROMPTS)
    written = files(tmp_path)
    assert len(written) == len(PROMPTS)
    for prompt in PROMPTS:  # directory/<2 hex>/<key>.safetensors, key = sha256(fingerprint, prompt)
        path = cache.path(prompt)
        assert path.parent.name == path.stem[:2] and len(path.stem) == 64 and path in written
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".safetensors"]  # no temp left

    second = Counting()  # a new run: same seed, so the same fingerprint
    again = ConditioningCache(second, capacity=4, directory=tmp_path)
    out = again(PROMPTS)
    assert second.calls == [] and again.disk_hits == len(PROMPTS)
    assert out.keys() == expected.keys()
    assert torch.equal(out["text"], expected["text"])
    assert len(again.rows) == len(PROMPTS)  # this batch, then trimmed to capacity on the next call
    again(PROMPTS[:2])
    assert len(again.rows) == 4 and second.calls == []


def test_files_are_safetensors_that_name_their_prompt_and_fingerprint(tmp_path: Path):
    policy = Counting()
    cache = ConditioningCache(policy, directory=tmp_path)
    row = cache(["a red square"])
    with safe_open(str(cache.path("a red square")), framework="pt") as f:
        assert f.metadata() == {"format": FORMAT, "fingerprint": policy.conditioning_fingerprint(),
                                "prompt": "a red square"}
        assert torch.equal(f.get_tensor("text"), row["text"])


def test_a_changed_fingerprint_makes_new_keys(tmp_path: Path):
    ConditioningCache(Counting(seed=0), directory=tmp_path)(PROMPTS[:3])
    other = Counting(seed=1)  # other encoder weights
    cache = ConditioningCache(other, directory=tmp_path)
    cache(PROMPTS[:3])
    assert other.calls == [PROMPTS[:3]] and cache.disk_hits == 0
    assert len(files(tmp_path)) == 6


def test_reads_load_only_the_prompts_asked_for(tmp_path: Path):
    ConditioningCache(Counting(), directory=tmp_path)(PROMPTS)
    policy = Counting()
    cache = ConditioningCache(policy, capacity=2, directory=tmp_path)
    cache(PROMPTS[3:5])
    assert cache.disk_hits == 2 and list(cache.rows) == PROMPTS[3:5] and policy.calls == []


def test_a_damaged_file_is_encoded_again_and_rewritten(tmp_path: Path):
    first = ConditioningCache(Counting(), directory=tmp_path)
    expected = first(PROMPTS[:2])
    first.path(PROMPTS[0]).write_bytes(b"not a safetensors file")
    policy = Counting()
    cache = ConditioningCache(policy, directory=tmp_path)
    out = cache(PROMPTS[:2])
    assert policy.calls == [PROMPTS[:1]] and cache.disk_hits == 1
    assert torch.equal(out["text"], expected["text"])
    assert ConditioningCache(Counting(), directory=tmp_path)(PROMPTS[:1])["text"].equal(expected["text"][:1])


def test_a_policy_without_fingerprint_caches_in_memory_only(tmp_path: Path):
    with pytest.warns(UserWarning, match="train.conditioning_cache.*conditioning_fingerprint"):
        cache = ConditioningCache(NoFingerprint(), directory=tmp_path / "c")
    cache(PROMPTS[:2])
    assert cache.directory is None and not (tmp_path / "c").exists()


def test_an_unusable_folder_is_an_error_naming_the_key(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FlowFactoryError, match="train.conditioning_cache=.*null"):
        ConditioningCache(Counting(), directory=blocker / "sub")


def _fill(folder: str, prompts: list[str], queue: multiprocessing.Queue) -> None:
    """Encode or read every prompt, then twice more rewrite each file while reading it back (rows cleared):
    puts (whether no read after the first round failed, files written)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed write must not be hidden
        policy = Counting()
        cache = ConditioningCache(policy, directory=folder)
        for p in prompts:
            cache([p])
        calls = len(policy.calls)
        for _ in range(2):
            for p in prompts:
                cache.rows.clear()
                cache._write(p, cache([p]))  # the other process reads and writes the same key meanwhile
    queue.put((len(policy.calls) == calls, cache.disk_writes))


def test_processes_sharing_the_folder_write_whole_files(tmp_path: Path):
    """Two processes write and read the same keys at once: every read finds a whole file, none is left
    behind half-written or as a temporary, and every file holds the right conditioning."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_fill, args=(str(tmp_path), PROMPTS, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = [queue.get(timeout=5) for _ in procs]
    assert all(clean for clean, _ in results)  # every read of a key being rewritten found a whole file
    assert all(writes >= 2 * len(PROMPTS) for _, writes in results)
    assert len(files(tmp_path)) == len(PROMPTS)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".safetensors"]
    policy = Counting()
    out = ConditioningCache(policy, directory=tmp_path)(PROMPTS)
    assert policy.calls == [] and torch.equal(out["text"], ToyPolicy().encode(PROMPTS)["text"])
