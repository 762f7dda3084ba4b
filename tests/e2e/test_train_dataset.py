"""Dataset algorithms end to end on the toy policy: SFT on target images and offline DPO on chosen/rejected
pairs learn (the held-out eval reward rises; nothing is sampled in training), rows carry the encoded targets and
their labels, a resumed run equals an uninterrupted one, 2 processes equal 1, and a record without its target
image is refused before the run starts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from runs import free_port, rows, same_weights, train
from test_parallel import FSDP, assert_same_run, torchrun

from flowfactory.errors import FlowFactoryError

QUIET = {"sample_every": 0, "checkpoint_every": 0}
SFT = {"name": "sft", "options": {"num_times": 2}}
DPO_OFFLINE = {"name": "dpo", "options": {"source": "dataset", "num_times": 2, "beta": 100.0}}
ODE = {"name": "ode", "options": {"steps": 6}}


def _dataset(tmp_path, n: int = 4) -> str:
    """n records, each with a bright `target`/`chosen` image and a dark `rejected` one (8x8, mildly textured)."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        for name, level in (("bright", 225), ("dark", 30)):
            px = np.clip(level + rng.integers(-20, 20, size=(8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(tmp_path / f"{name}-{i}.png")
        lines.append({"prompt": f"picture {i}", "target": f"bright-{i}.png", "chosen": f"bright-{i}.png",
                      "rejected": f"dark-{i}.png"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def test_sft_learns_the_target_images(toy_registry, toy_config, tmp_path):
    data = _dataset(tmp_path)
    path = toy_config(optimizer=SFT, sampler=ODE, data={"train": data, "eval": "colours-eval"},
                      train={**QUIET, "epochs": 16, "prompts_per_epoch": 4, "group_size": 2, "eval_every": 1})
    summary = train(path, tmp_path / "run")
    log = rows(tmp_path / "run")
    assert summary.metric == "eval/reward/mean"  # the train reward is the dataset's label: eval shows learning
    assert all(r["reward/mean"] == 1.0 and r["reward/dataset/mean"] == 1.0 for r in log)
    assert log[-1]["sft/mse"] < log[0]["sft/mse"]
    # eval brightness (ODE samples from noise on held-out prompts) moves towards the targets' ~0.88
    assert summary.reward_last > summary.reward_first + 0.1, (summary.reward_first, summary.reward_last)


def test_offline_dpo_prefers_the_chosen_images(toy_registry, toy_config, tmp_path):
    data = _dataset(tmp_path)
    path = toy_config(optimizer=DPO_OFFLINE, sampler=ODE, data={"train": data, "eval": "colours-eval"},
                      train={**QUIET, "epochs": 10, "prompts_per_epoch": 4, "group_size": 2, "micro_batch_size": 8,
                             "eval_every": 1, "lr": 1e-2})
    summary = train(path, tmp_path / "run")
    log = rows(tmp_path / "run")
    assert all(r["reward/mean"] == 0.5 and r["dpo/pairs"] == 4.0 for r in log)  # chosen 1, rejected 0: 4 pairs
    assert log[-1]["dpo/implicit_acc"] == 1.0
    assert summary.reward_last > summary.reward_first + 0.05, (summary.reward_first, summary.reward_last)


def test_dataset_rows_are_the_encoded_targets(toy_registry, toy_config, tmp_path):
    """With store_rollouts the rows of an epoch are kept: row j of a group is targets[j]'s latents."""
    data = _dataset(tmp_path, n=2)
    path = toy_config(optimizer=DPO_OFFLINE, sampler=ODE, data={"train": data, "eval": None},
                      train={**QUIET, "epochs": 1, "prompts_per_epoch": 2, "group_size": 2, "micro_batch_size": 4,
                             "eval_every": 0, "store_rollouts": True, "store_media": "float32"})
    train(path, tmp_path / "run")
    from safetensors import safe_open

    from flowfactory.prompts import fit_image, load_image

    (f,) = (tmp_path / "run" / "rollouts").rglob("*.safetensors")
    with safe_open(str(f), "pt") as st:
        final, meta = st.get_tensor("trajectory.final"), json.loads(st.metadata()["flowfactory.rollouts"])
        labels = st.get_tensor("reward.dataset")
    assert labels.tolist() == [1.0, 0.0, 1.0, 0.0]
    for row, record in enumerate(meta["records"]):
        name = ("chosen", "rejected")[row % 2]
        want = fit_image(load_image(record[name], "x"), 8, 8) * 2 - 1  # the toy's encode_image
        torch.testing.assert_close(final[row], want)


def test_sft_resume_equals_uninterrupted_and_two_processes_equal_one(toy_registry, toy_config, tmp_path):
    data = _dataset(tmp_path)
    path = toy_config(optimizer=SFT, sampler=ODE, data={"train": data, "eval": None},
                      train={**QUIET, "epochs": 4, "prompts_per_epoch": 4, "group_size": 2, "eval_every": 0,
                             "checkpoint_every": 2, **FSDP})
    train(path, tmp_path / "full")
    train(path, tmp_path / "part", ["train.epochs=2"])
    train(path, tmp_path / "part", resume=True)
    assert same_weights(tmp_path / "full", tmp_path / "part")
    torchrun(path, tmp_path / "two", port=free_port())
    assert_same_run(tmp_path / "full", tmp_path / "two", 1e-5)


def test_a_record_without_its_target_is_refused_before_the_run(toy_registry, toy_config, tmp_path):
    data = _dataset(tmp_path, n=2)
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    broken = json.loads(lines[1])
    del broken["rejected"]
    (tmp_path / "pairs.jsonl").write_text(lines[0] + "\n" + json.dumps(broken) + "\n")
    path = toy_config(optimizer=DPO_OFFLINE, sampler=ODE, data={"train": data, "eval": None},
                      train={**QUIET, "epochs": 1, "prompts_per_epoch": 2, "group_size": 2, "micro_batch_size": 4})
    with pytest.raises(FlowFactoryError, match=r"data.train: record 2 \('picture 1'\) has no 'rejected' image"):
        train(path, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    bad_group = toy_config(optimizer=DPO_OFFLINE, sampler=ODE, data={"train": data, "eval": None},
                           train={**QUIET, "epochs": 1, "prompts_per_epoch": 2, "group_size": 3, "micro_batch_size": 6})
    with pytest.raises(FlowFactoryError, match="group_size must be a multiple of 2, got 3"):
        train(bad_group, tmp_path / "run2")
