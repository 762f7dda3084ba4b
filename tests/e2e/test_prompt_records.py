"""Prompt records through a real run: a .jsonl set with input images and metadata reaches the rewards
(`Samples.inputs`, `Samples.metadata`) at train and eval, and the rollout store keeps the records for replay."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from runs import rows, same_weights, train

from flowfactory.registry import ComponentSpec, NoOptions


class SourceBrightness:
    """1 - |brightness - the input image's brightness|; records what every call received."""

    groupwise = False
    handles_video = False

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def score(self, samples):
        src = torch.stack([r.load_images()[0].mean() for r in samples.inputs])
        self.calls.append({"prompts": list(samples.prompts), "metadata": list(samples.metadata),
                           "sources": src.tolist(), "n_inputs": [len(r.images) for r in samples.inputs]})
        return (1 - (samples.images.mean(dim=(1, 2, 3)) - src.to(samples.images)).abs()).float()


def _register(registry, name: str, reward) -> None:
    registry._specs["reward"][name] = ComponentSpec("reward", name, lambda o, c: reward, NoOptions, name, "tests", "0")


def _dataset(tmp_path) -> None:
    (tmp_path / "src").mkdir()
    for name, v in (("dark", 40), ("light", 220)):
        Image.fromarray(np.full((4, 4, 3), v, dtype=np.uint8)).save(tmp_path / "src" / f"{name}.png")
    lines = [{"prompt": "match it", "image": "src/dark.png", "want": "dark"},
             {"prompt": "match it", "image": "src/light.png", "want": "light"}]
    (tmp_path / "edits.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_rewards_see_each_records_input_images_and_metadata(toy_registry, toy_config, tmp_path):
    _dataset(tmp_path)
    reward = SourceBrightness()
    _register(toy_registry, "source-brightness", reward)
    edits = str(tmp_path / "edits.jsonl")
    path = toy_config(rewards=[{"name": "source-brightness"}], data={"train": edits, "eval": edits},
                      train={"epochs": 2, "prompts_per_epoch": 2, "group_size": 2, "micro_batch_size": 4,
                             "eval_every": 2, "eval_prompts": 2, "store_rollouts": True,
                             "store_media": "float32"})
    train(path, tmp_path / "run")
    want = {"dark": 40 / 255, "light": 220 / 255}
    assert len(reward.calls) >= 3  # train epochs and the eval
    for call in reward.calls:
        # the two records share their text; only their images (and metadata) tell them apart
        assert set(call["prompts"]) == {"match it"} and call["n_inputs"] == [1] * len(call["prompts"])
        for meta, src in zip(call["metadata"], call["sources"], strict=True):
            assert abs(src - want[meta["want"]]) < 1e-6, call
    assert {m["want"] for c in reward.calls for m in c["metadata"]} == {"dark", "light"}
    # the store keeps the records: a replay re-scores the stored samples against the same source images
    replay = SourceBrightness()
    _register(toy_registry, "source-brightness-2", replay)
    path2 = toy_config(rewards=[{"name": "source-brightness-2"}], data={"train": str(tmp_path / "edits.jsonl"),
                                                                  "replay": str(tmp_path / "run")},
                       train={"epochs": 2, "prompts_per_epoch": 2, "group_size": 2, "micro_batch_size": 4,
                              "eval_every": 0})
    train(path2, tmp_path / "replayed")
    assert [c["metadata"] for c in replay.calls] == [c["metadata"] for c in reward.calls[:2]]
    assert [c["sources"] for c in replay.calls] == [c["sources"] for c in reward.calls[:2]]
    first = rows(tmp_path / "run")
    assert [r["reward/mean"] for r in rows(tmp_path / "replayed")] == [r["reward/mean"] for r in first]
    assert same_weights(tmp_path / "run", tmp_path / "replayed")
