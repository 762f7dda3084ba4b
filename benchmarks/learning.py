"""Learning speed of grpo, nft, awm and mixgrpo on the quickstart task, side by side, in one process.

Each algorithm runs its shipped quickstart config (examples/quickstart.yaml, quickstart-nft.yaml,
quickstart-awm.yaml, quickstart-mixgrpo.yaml: same tiny FLUX, same prompts, same reward, same seed, same
rollouts per epoch) for the same number of epochs. For each it prints the wall-clock seconds and epochs
until the reward, smoothed over a window of epochs, first reaches the target, and the reward at the end.

    python benchmarks/learning.py                       # 70 epochs each, target 0.15
    python benchmarks/learning.py --epochs 40 --target 0.12 --only grpo nft
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from flowfactory.config import load
from flowfactory.train import run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"grpo": "quickstart.yaml", "nft": "quickstart-nft.yaml", "awm": "quickstart-awm.yaml",
           "mixgrpo": "quickstart-mixgrpo.yaml", "dppo": "quickstart-dppo.yaml", "dpo": "quickstart-dpo.yaml",
           "draft": "quickstart-draft.yaml"}


def reach(rows: list[dict], target: float, window: int) -> tuple[int | None, float | None]:
    """(epoch, cumulative seconds) when the `window`-epoch running mean of reward/mean first >= target."""
    seconds = 0.0
    for i, row in enumerate(rows):
        seconds += row["time/epoch_s"]
        recent = [r["reward/mean"] for r in rows[max(0, i - window + 1): i + 1]]
        if len(recent) == window and sum(recent) / window >= target:
            return row["epoch"], seconds
    return None, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=70)
    ap.add_argument("--target", type=float, default=0.15, help="smoothed mean reward to reach")
    ap.add_argument("--window", type=int, default=5, help="epochs in the running mean")
    ap.add_argument("--only", nargs="*", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    args = ap.parse_args()
    results = []
    for name in args.only:
        cfg, options = load(ROOT / "examples" / CONFIGS[name],
                            [f"train.epochs={args.epochs}", "train.eval_every=0", "train.sample_every=0",
                             "train.checkpoint_every=0", "train.tensorboard=false"])
        with tempfile.TemporaryDirectory() as tmp:
            summary = run(cfg, options, output_dir=tmp, show_progress=False)
            rows = [json.loads(ln) for ln in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        epoch, seconds = reach(rows, args.target, args.window)
        results.append((name, epoch, seconds, summary.reward_first, summary.reward_last,
                        sum(r["time/epoch_s"] for r in rows) / len(rows)))
        print(f"{name}: done", flush=True)
    print(f"\nquickstart task, {args.epochs} epochs each, target: {args.window}-epoch mean reward >= {args.target}")
    print(f"{'algorithm':<10}{'epochs to target':>18}{'seconds to target':>19}{'s/epoch':>9}"
          f"{'reward first 5':>16}{'reward last 5':>15}")
    for name, epoch, seconds, first, last, per in results:
        e = str(epoch) if epoch is not None else "not reached"
        s = f"{seconds:.1f}" if seconds is not None else "-"
        print(f"{name:<10}{e:>18}{s:>19}{per:>9.2f}{first:>16.3f}{last:>15.3f}")


if __name__ == "__main__":
    main()
