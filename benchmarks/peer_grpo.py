"""GRPO side by side with Flow-Factory: the same random FLUX pipeline, prompts, reward and settings, per epoch.

Both projects train one random pipeline folder (a tiny FLUX.1 with distilled-guidance input, which
Flow-Factory's FLUX adapter always feeds; 1 latent channel; saved once and loaded by both with their
`from_pretrained`) on the same four prompts with a brightness reward (mean Rec. 601 luma): GRPO full
finetune, Flow-SDE with noise 0.7 and a one-step SDE window drawn from the first half of 8 steps, 4 prompts
x 4, micro-batch 4, lr 3e-4, clip 1e-4, max grad norm 1, no weight decay, no KL, per-group advantage std,
float32, T5 at 512 tokens (Flow-Factory's FLUX adapter always pads to 512). Each run is a fresh process with
one thread; `--jobs 2` runs two at a time. Prints the mean reward of every epoch and, per run, the last
epoch minus the first.

Flow-Factory is not a dependency of this repository: give the Python of an environment where
`import flow_factory` works and torch/diffusers/transformers/accelerate are installed (a checkout installed
with `pip install --no-deps -e .` plus `datasets` and `einops` is enough on CPU):

    python benchmarks/peer_grpo.py --peer-python /path/to/venv/bin/python
    python benchmarks/peer_grpo.py --peer-python ... --seeds 0 7 --steps 1 2 --epochs 8 --jobs 2

Two settings of the peer run differ from its defaults, because its defaults do not run in float32 on a CPU:
it keeps trajectories in float32 (`latent_storage_dtype: fp32`; its default float16 feeds half-precision
latents to a float32 transformer, which only works under autocast) and its bfloat16 `torch.autocast`,
which it enters even with `mixed_precision: "no"`, is disabled (CPU autocast fails on the FLUX
transformer's position ids). On a GPU the peer's "fp32" run therefore computes in bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = ["a red square", "a blue square", "a green square", "a yellow square"]

OURS = """\
name: peer-grpo
seed: {seed}
policy:
  name: flux
  options: {{model: {pipe}, dtype: float32, height: 32, width: 32, max_sequence_length: {tokens}}}
sampler:
  name: flow-sde
  options: {{steps: 8, noise_level: 0.7, sde_window_size: 1}}
rewards:
  - name: brightness
optimizer:
  name: grpo
  options: {{clip_range: 1.0e-4, kl_beta: 0.0}}
data:
  train: {prompts}
  eval: null
train:
  epochs: {epochs}
  prompts_per_epoch: 4
  group_size: 4
  lr: 3.0e-4
  steps_per_epoch: {steps}
  micro_batch_size: 4
  rollout_batch_size: 16
  max_grad_norm: 1.0
  weight_decay: 0.0
  adv_std: group
  eval_every: 0
  sample_every: 0
  checkpoint_every: 0
  tensorboard: false
"""

PEER = """\
mixed_precision: "no"
data:
  dataset_dir: {data}
  preprocessing_batch_size: 4
  dataloader_num_workers: 0
  force_reprocess: true
  cache_dir: {out}/cache
model:
  finetune_type: full
  target_modules: all
  master_weight_dtype: fp32
  model_name_or_path: {pipe}
  model_type: flux1
log:
  logging_backend: none
  save_dir: {out}/saves
  save_freq: 0
  verbose: false
train:
  trainer_type: grpo
  max_epochs: {epochs}
  advantage_aggregation: sum
  clip_range: 1.0e-4
  adv_clip_range: 5.0
  kl_beta: 0
  ref_param_device: cpu
  resolution: 32
  num_inference_steps: 8
  guidance_scale: 3.5
  per_device_batch_size: 4
  group_size: 4
  global_std: false
  unique_sample_num_per_epoch: 4
  gradient_step_per_epoch: {steps}
  seed: {seed}
  learning_rate: 3.0e-4
  adam_weight_decay: 0.0
  max_grad_norm: 1.0
  ema_decay: 0
  ema_device: cpu
  latent_storage_dtype: fp32
scheduler:
  dynamics_type: Flow-SDE
  noise_level: 0.7
  num_sde_steps: 1
  sde_steps: [0, 1, 2, 3]
  seed: {seed}
eval:
  eval_freq: 0
rewards:
  - name: brightness
    reward_model: peer_brightness.Brightness
    weight: 1.0
    batch_size: 16
    device: cpu
    dtype: float32
"""

# The peer's reward plugin and a driver that records what its trainer logs. Written into the work folder
# and run by --peer-python; nothing here imports flow_factory.
PEER_REWARD = '''\
import numpy as np
import torch
from flow_factory.rewards.abc import PointwiseRewardModel, RewardModelOutput


class Brightness(PointwiseRewardModel):
    """Mean Rec. 601 luma in [0, 1], as flowfactory's built-in `brightness`."""

    @torch.no_grad()
    def __call__(self, prompt, image=None, video=None, condition_images=None, condition_videos=None):
        luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        values = []
        for im in image:
            if isinstance(im, torch.Tensor):
                a = im.float().permute(1, 2, 0).cpu().numpy() if im.shape[0] == 3 else im.float().cpu().numpy()
            else:
                a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
            values.append(float((a * luma).sum(-1).mean()))
        return RewardModelOutput(rewards=torch.tensor(values, dtype=torch.float32), extra_info={})
'''

PEER_DRIVER = '''\
import functools, json, sys
import torch
from flow_factory.hparams import Arguments
from flow_factory.trainers import load_trainer

trainer = load_trainer(Arguments.load_from_yaml(sys.argv[1]))
trainer.autocast = functools.partial(torch.autocast, device_type="cpu", enabled=False)
log_data, out = trainer.log_data, open(sys.argv[2], "w")


def record(data, step):
    row = {"step": step, "epoch": trainer.epoch}
    for k, v in data.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            row[k] = float(v)
        elif isinstance(v, (int, float)):
            row[k] = float(v)
    out.write(json.dumps(row) + "\\n")
    out.flush()
    return log_data(data, step)


trainer.log_data = record
trainer.start()
'''


def build_pipeline(folder: Path) -> None:
    from flowfactory_flux.tiny import TinyFluxSpec, build_tiny_pipeline

    if not (folder / "model_index.json").exists():
        build_tiny_pipeline(0, TinyFluxSpec(latent_channels=1, guidance_embeds=True)).save_pretrained(folder)


def ours(work: Path, seed: int, steps: int, epochs: int, tokens: int) -> list[float]:
    out = work / f"ours-s{seed}-k{steps}"
    cfg = out.with_suffix(".yaml")
    cfg.write_text(OURS.format(seed=seed, pipe=work / "pipe", tokens=tokens, prompts=work / "data" / "train.txt",
                               epochs=epochs, steps=steps))
    ff = Path(sys.executable).with_name("ff")
    log = out.with_suffix(".log")
    with log.open("w") as fh:
        subprocess.run([str(ff), "run", str(cfg), "-o", str(out)], check=True, stdout=fh, stderr=subprocess.STDOUT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"})
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["reward/mean"] for r in rows]


def peer(work: Path, python: str, seed: int, steps: int, epochs: int) -> list[float]:
    out = work / f"peer-s{seed}-k{steps}"
    out.mkdir(exist_ok=True)
    cfg = out.with_suffix(".yaml")
    cfg.write_text(PEER.format(data=work / "data", out=out, pipe=work / "pipe", epochs=epochs, steps=steps,
                               seed=seed))
    metrics = out / "metrics.jsonl"
    with out.with_suffix(".log").open("w") as fh:
        subprocess.run([python, str(work / "peer_driver.py"), str(cfg), str(metrics)], check=True, stdout=fh,
                       stderr=subprocess.STDOUT, cwd=work,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(work)})
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    return [r["train/reward_mean"] for r in rows if "train/reward_mean" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer-python", required=True, help="Python of an environment that imports flow_factory")
    ap.add_argument("--work", type=Path, default=Path("runs/peer-grpo"), help="folder for the pipeline and runs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 7])
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2], help="optimizer steps per epoch")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512, help="T5 tokens on our side (the peer always uses 512)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses one thread)")
    args = ap.parse_args()

    work = args.work.resolve()
    (work / "data").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (work / "data" / f"{split}.txt").write_text("\n".join(PROMPTS) + "\n")
    (work / "peer_brightness.py").write_text(PEER_REWARD)
    (work / "peer_driver.py").write_text(PEER_DRIVER)
    build_pipeline(work / "pipe")

    jobs = [(side, seed, steps) for seed in args.seeds for steps in args.steps for side in ("flowfactory", "Flow-Factory")]

    def one(job: tuple[str, int, int]) -> list[float]:
        side, seed, steps = job
        rewards = (ours(work, seed, steps, args.epochs, args.tokens) if side == "flowfactory"
                   else peer(work, args.peer_python, seed, steps, args.epochs))
        print(f"{side} seed {seed} steps {steps}: done", flush=True)
        return rewards

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, jobs))

    print(textwrap.dedent(f"""
        GRPO, random FLUX (1 latent channel, guidance input), brightness, 4 prompts x 4, {args.epochs} epochs;
        mean reward per epoch; gain = last epoch - first"""))
    print(f"{'project':<13}{'seed':>5}{'steps':>6}  {'rewards':<{8 * args.epochs}}{'gain':>8}")
    for (side, seed, steps), rewards in zip(jobs, results):
        curve = " ".join(f"{r:.4f} " for r in rewards)
        print(f"{side:<13}{seed:>5}{steps:>6}  {curve:<{8 * args.epochs}}{rewards[-1] - rewards[0]:>+8.4f}")


if __name__ == "__main__":
    main()
