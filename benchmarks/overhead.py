"""Overhead of flowfactory's loop against a minimal hand-written GRPO loop, in the same process.

Both sides use the same policy (built once per side from the same preset and seed), the same Flow-SDE
step math, the same batch (prompts x group size), the same AdamW settings and one optimizer step per
epoch. The hand loop is what a researcher would write in a fork: encode, sample with log-probs, reward,
group-normalise, one backward per trained step, clip, step. It skips what the loop adds (metrics,
progress, checkpoints are disabled on the flowfactory side too).

    python benchmarks/overhead.py                 # tiny FLUX, 4 prompts x 4, 8 steps
    python benchmarks/overhead.py --policy toy    # the toy test policy (no diffusers)

Prints the median seconds per epoch of each side and the ratio flowfactory / hand (target <= 1.05).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import flowfactory.plugins as plugins
from flowfactory.config import validate
from flowfactory.registry import BuildContext
from flowfactory.testing import plugin as toy_plugin
from flowfactory.train import run


def config(args: argparse.Namespace) -> dict:
    options = {"preset": "tiny"} if args.policy == "flux" else {"size": 8}
    return {
        "name": "overhead", "seed": 0,
        "policy": {"name": args.policy, "options": options},
        "sampler": {"name": "flow-sde", "options": {"steps": args.steps, "noise_level": 0.7}},
        "rewards": [{"name": "brightness"}],
        "optimizer": {"name": "grpo", "options": {"clip_range": 1e-4}},
        "data": {"train": "colours", "eval": None},
        "train": {"epochs": args.epochs, "prompts_per_epoch": args.prompts, "group_size": args.group,
                  "micro_batch_size": args.prompts * args.group, "rollout_batch_size": args.prompts * args.group,
                  "lr": 1e-4, "eval_every": 0, "sample_every": 0, "checkpoint_every": 0, "tensorboard": False,
                  "adv_clip": 5.0},
    }


def flowfactory_epochs(cfg_dict: dict) -> list[float]:
    cfg, options = validate(cfg_dict, "<benchmark>")
    with tempfile.TemporaryDirectory() as tmp:
        run(cfg, options, output_dir=tmp, show_progress=False)
        rows = [json.loads(ln) for ln in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    return [r["time/epoch_s"] for r in rows]


def hand_epochs(cfg_dict: dict) -> list[float]:
    """A minimal GRPO loop written directly against the policy's methods."""
    from flowfactory.rewards.builtin import Brightness
    from flowfactory.train.data import load_prompts

    registry = plugins.get_registry()
    policy = registry.get("policy", cfg_dict["policy"]["name"]).create(cfg_dict["policy"]["options"],
                                                                      BuildContext(seed=0))
    t = cfg_dict["train"]
    steps, a, clip = cfg_dict["sampler"]["options"]["steps"], 0.7, 1e-4
    params = policy.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=t["lr"])
    prompts_all = load_prompts("colours")
    reward = Brightness()
    times = []
    for epoch in range(1, t["epochs"] + 1):
        t0 = time.perf_counter()
        rng = np.random.default_rng([0, epoch, 1])
        chosen = rng.choice(len(prompts_all), size=t["prompts_per_epoch"], replace=False)
        prompts = [prompts_all[i] for i in chosen for _ in range(t["group_size"])]
        with torch.no_grad():
            cond = policy.encode(list(dict.fromkeys(prompts)))
            index = torch.tensor([list(dict.fromkeys(prompts)).index(p) for p in prompts])
            cond = {k: v[index] for k, v in cond.items()}
        gens = [torch.Generator().manual_seed(epoch * 1000 + i) for i in range(len(prompts))]
        sigmas = policy.sigmas(steps)

        def step(x, i, noise=None):
            s, sn = float(sigmas[i]), float(sigmas[i + 1])
            v = policy.velocity(x, torch.full((x.shape[0],), s), cond).float()
            dt = sn - s
            std = math.sqrt(s / (1 - (float(sigmas[1]) if s >= 1 else s))) * a
            mean = x.float() * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
            return mean, std * math.sqrt(-dt)

        with torch.no_grad():
            x = policy.noise(gens)
            xs, lps = [x], []
            for i in range(steps):
                mean, std = step(x, i)
                if i < steps - 1:
                    eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])
                    x = mean + std * eps
                    lps.append((-((x - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi))
                               .mean(dim=tuple(range(1, x.ndim))))
                else:
                    x = mean
                xs.append(x)
            images = policy.decode(x)
        from flowfactory.types import Samples

        r = reward.score(Samples(prompts=prompts, images=images))
        g = r.view(t["prompts_per_epoch"], t["group_size"])
        adv = ((g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + 1e-4)).flatten().clamp(-5, 5)
        for i in range(steps - 1):
            mean, std = step(xs[i], i)
            lp = (-((xs[i + 1] - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean(
                dim=tuple(range(1, mean.ndim)))
            ratio = torch.exp(lp - lps[i])
            loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean() / (steps - 1)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="flux", choices=["flux", "toy"])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of both sides")
    args = ap.parse_args()
    plugins._STATE = plugins.load(extra_plugins=[(toy_plugin, "flowfactory-testing", "0")])
    torch.set_num_threads(torch.get_num_threads())
    cfg = config(args)
    ours, hand = [], []
    for _ in range(args.rounds):  # alternate so drift on a noisy machine hits both sides
        ours += flowfactory_epochs(cfg)[1:]  # the first epoch warms caches on both sides
        hand += hand_epochs(cfg)[1:]
    mo, mh = statistics.median(ours), statistics.median(hand)
    print(f"policy={args.policy} steps={args.steps} batch={args.prompts}x{args.group} epochs={args.epochs} "
          f"rounds={args.rounds} threads={torch.get_num_threads()}")
    print(f"flowfactory  median {mo:.3f} s/epoch  (n={len(ours)})")
    print(f"hand loop    median {mh:.3f} s/epoch  (n={len(hand)})")
    print(f"ratio flowfactory/hand = {mo / mh:.3f}   (target <= 1.05)")


if __name__ == "__main__":
    main()
