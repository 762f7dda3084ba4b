"""Reward scoring overlapped with the rollout, against inline scoring, in the same process.

A slow scorer (a remote judge) costs a fixed time per call. With `train.overlap_rewards` each rollout chunk
(whole groups) is scored in a worker thread while the next chunk samples; without it every call waits inline.
Both runs use the same config, seed and chunks, so their rewards and weights must be identical: the script
checks that, then prints the mean seconds per epoch of each and the ratio overlap / inline.

    python benchmarks/reward_overlap.py                         # tiny FLUX, 4 prompts x 4, chunks of 4
    python benchmarks/reward_overlap.py --policy toy --delay 0.2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import flowfactory.plugins as plugins
from flowfactory import hookimpl
from flowfactory.config import validate
from flowfactory.testing import plugin as toy_plugin
from flowfactory.train import run


class SlowBrightness:
    """Brightness after a fixed wait per call, as a scorer behind a network would answer."""

    groupwise = False
    handles_video = False

    def __init__(self, delay: float):
        self.delay = delay

    def score(self, samples):
        time.sleep(self.delay)
        return samples.images.float().mean(dim=(1, 2, 3)).cpu()


class SlowRewardPlugin:
    def __init__(self, delay: float):
        self.delay = delay

    @hookimpl
    def register_rewards(self, register):
        register("slow-brightness", lambda options, ctx: SlowBrightness(self.delay),
                 summary="Brightness that waits a fixed time per call.")


def config(args: argparse.Namespace, overlap: bool) -> dict:
    options = {"preset": "tiny"} if args.policy == "flux" else {"size": 8}
    return {
        "name": "overlap", "seed": 0,
        "policy": {"name": args.policy, "options": options},
        # a window of 2 stochastic steps (Flow-GRPO-Fast) keeps the update short: the epoch is mostly rollout
        "sampler": {"name": "flow-sde", "options": {"steps": args.steps, "noise_level": 0.7, "sde_window_size": 2}},
        "rewards": [{"name": "slow-brightness"}],
        "optimizer": {"name": "grpo", "options": {"clip_range": 1e-4}},
        "data": {"train": "colours", "eval": None},
        "train": {"epochs": args.epochs, "prompts_per_epoch": args.prompts, "group_size": args.group,
                  "rollout_batch_size": args.chunk, "micro_batch_size": args.prompts * args.group,
                  "overlap_rewards": overlap, "lr": 1e-4, "eval_every": 0, "sample_every": 0,
                  "checkpoint_every": 0, "tensorboard": False},
    }


def one_run(args: argparse.Namespace, overlap: bool) -> tuple[list[dict], dict[str, torch.Tensor]]:
    cfg, options = validate(config(args, overlap), "<benchmark>")
    with tempfile.TemporaryDirectory() as tmp:
        run(cfg, options, output_dir=tmp, show_progress=False)
        rows = [json.loads(ln) for ln in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        from safetensors.torch import load_file

        weights = {}
        for f in sorted((Path(tmp) / "final").rglob("*.safetensors")):
            weights.update({f"{f.name}/{k}": v for k, v in load_file(f).items()})
    return rows, weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", choices=["flux", "toy"], default="flux")
    ap.add_argument("--delay", type=float, default=0.5, help="seconds the scorer takes per call")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=4, help="train.rollout_batch_size (rows per rollout chunk)")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    plugins._STATE = plugins.load(extra_plugins=[(toy_plugin, "flowfactory-testing", "0"),
                                                 (SlowRewardPlugin(args.delay), "benchmark", "0")])
    runs = {}
    for overlap in (False, True, False, True):  # alternate, so drift of the machine hits both sides alike
        rows, weights = one_run(args, overlap)
        runs.setdefault(overlap, []).append((rows, weights))
    (rows_off, w_off), (rows_on, w_on) = runs[False][0], runs[True][0]
    same_rewards = [r["reward/mean"] for r in rows_off] == [r["reward/mean"] for r in rows_on]
    same_weights = w_off.keys() == w_on.keys() and all(torch.equal(w_off[k], w_on[k]) for k in w_off)
    # the first epoch carries one-off costs (encoder, allocator): compare the rest
    secs = {o: statistics.mean(r["time/epoch_s"] for rows, _ in runs[o] for r in rows[1:]) for o in runs}
    chunks = -(-args.prompts * args.group // (-(-args.chunk // args.group) * args.group))
    print(f"policy {args.policy}, {args.prompts} prompts x {args.group}, rollout chunks of {args.chunk} rows, "
          f"{chunks} scoring calls per epoch of {args.delay:.2f} s each")
    print(f"identical rewards: {same_rewards}; identical final weights: {same_weights}")
    print(f"inline scoring:     {secs[False]:.3f} s/epoch")
    print(f"overlapped scoring: {secs[True]:.3f} s/epoch")
    print(f"ratio overlap / inline: {secs[True] / secs[False]:.3f}")
    if not (same_rewards and same_weights):
        raise SystemExit("overlapped scoring changed the run")


if __name__ == "__main__":
    main()
