"""Rewards score each rollout chunk while the next one samples: the same scores and weights as inline scoring,
whole groups in every groupwise call (on every process), and a failing chunk stops the epoch before any update."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from runs import free_port, rows, train, weights
from test_parallel import ENV, torchrun

from flowfactory.errors import RewardError
from flowfactory.registry import ComponentSpec, NoOptions

CHUNKED = {"epochs": 4, "prompts_per_epoch": 4, "group_size": 4, "rollout_batch_size": 3, "micro_batch_size": 4,
           "eval_every": 2, "sample_every": 0, "checkpoint_every": 0}
TIMES = ("time/",)


def _metrics(out):
    return [{k: v for k, v in r.items() if not k.startswith(TIMES)} for r in rows(out)]


class Recording:
    """A groupwise reward (brightness centred on its group) that keeps each call's group ids."""

    groupwise = True
    handles_video = False

    def __init__(self, fail_at: int | None = None):
        self.calls: list[list[int]] = []
        self.fail_at = fail_at

    def score(self, samples):
        self.calls.append(list(samples.group_ids))
        if self.fail_at is not None and len(self.calls) >= self.fail_at:
            raise ConnectionError("scorer went away")
        b = samples.images.mean(dim=(1, 2, 3))
        ids = torch.tensor(samples.group_ids)
        return (b - torch.stack([b[ids == g].mean() for g in samples.group_ids])).float()


def _register(registry, name, reward):
    registry._specs["reward"][name] = ComponentSpec("reward", name, lambda o, c: reward, NoOptions, name, "tests", "0")


def test_overlapped_scoring_equals_inline_scoring_in_whole_groups(toy_registry, toy_config, tmp_path):
    on, off = Recording(), Recording()
    _register(toy_registry, "rec-on", on)
    _register(toy_registry, "rec-off", off)
    base = {"rewards": [{"name": "brightness"}, {"name": "rec-on"}]}
    train(toy_config(train={**CHUNKED, "overlap_rewards": True}, **base), tmp_path / "on")
    base = {"rewards": [{"name": "brightness"}, {"name": "rec-off"}]}
    train(toy_config(train={**CHUNKED, "overlap_rewards": False}, **base), tmp_path / "off")
    # rollout chunks of 3 rows, scored in chunks of whole groups (3 rounded up to the group size 4): 4 calls per
    # epoch of 16 rows, each holding exactly one group; eval calls score the 2 eval prompts at once, each its own
    # group
    train_calls = [c for c in on.calls if len(set(c)) == 1]
    assert len(on.calls) == len(train_calls) + 2
    assert len(train_calls) == 4 * 4 and all(len(c) == 4 and len(set(c)) == 1 for c in train_calls)
    assert on.calls == off.calls
    a = [{k.replace("rec-on", "rec"): v for k, v in r.items()} for r in _metrics(tmp_path / "on")]
    b = [{k.replace("rec-off", "rec"): v for k, v in r.items()} for r in _metrics(tmp_path / "off")]
    assert a == b  # every reward, advantage statistic, loss and eval value, exactly
    wa, wb = weights(tmp_path / "on"), weights(tmp_path / "off")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_chunk_that_fails_stops_the_epoch_before_any_update(toy_registry, toy_config, tmp_path):
    failing = Recording(fail_at=6)  # epoch 1 scores 4 chunks; epoch 2's second chunk raises
    _register(toy_registry, "rec-fail", failing)
    path = toy_config(train={**CHUNKED, "eval_every": 0, "checkpoint_every": 1}, rewards=[{"name": "rec-fail"}])
    with pytest.raises(RewardError, match="scorer went away"):
        train(path, tmp_path / "run")
    assert [r["epoch"] for r in rows(tmp_path / "run")] == [1]
    # the rollout stopped at the failure instead of sampling the rest of the epoch
    assert len(failing.calls) <= 7


def test_groupwise_calls_get_whole_groups_on_every_process(toy_registry, toy_config, tmp_path):
    """4 prompts x 4 over 2 processes, rollout chunks of 3: every call on every process holds whole groups, and
    the two processes' groups never overlap."""
    record = tmp_path / "calls.jsonl"
    path = toy_config(train={**CHUNKED, "epochs": 2, "eval_every": 0}, rewards=[{"name": "group-recorder"}])
    torchrun(path, tmp_path / "two", port=free_port(), env={**ENV, "FLOWFACTORY_TEST_RECORD": str(record)})
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(calls) == 2 * 2 * 2  # epochs x processes x (8 rows per process / chunks of 4)
    for call in calls:
        assert set(Counter(call["groups"]).values()) == {4}, call
    for epoch in range(2):
        by_rank = [{g for c in calls[epoch * 4:(epoch + 1) * 4] if c["rank"] == r for g in c["groups"]} for r in (0, 1)]
        assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]
