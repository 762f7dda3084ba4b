"""Scoring several rewards and combining them; a reward that misbehaves stops the run before any update.

The contract (docs/hooks.md, `flowfactory.types.Reward`): `score(samples)` returns a float32 tensor of shape
[B], finite. Anything else is a `RewardError` naming the reward: scores are never cast, so a float64 or
integer score is a bug the reward's author sees at once, not a silent conversion.

A reward's optional `timeout` (run config `rewards[i].timeout`, seconds) bounds each call: the call runs in a
worker thread, and when the time is up the run stops with a `RewardError` before any weight changes. A thread
cannot be killed, so the stuck call is abandoned: it runs on as a daemon thread (it does not keep the process
alive at exit) and its result, if it ever comes, is dropped.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import torch

from flowfactory.errors import RewardError
from flowfactory.types import Samples


def check_scores(name: str, scores: Any, n: int) -> torch.Tensor:
    """`scores` if it is a float32 tensor of shape [n], else a RewardError saying what is wrong and the fix."""
    if not isinstance(scores, torch.Tensor) or scores.shape != (n,):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise RewardError(f"reward {name!r} returned {shape}; expected a tensor of shape ({n},)")
    if scores.dtype != torch.float32:
        raise RewardError(f"reward {name!r} returned {scores.dtype} scores; rewards return float32 [B] "
                          f"(docs/hooks.md): end its score() with `return scores.float()`")
    return scores


def score_one(reward: Any, samples: Samples, name: str = "reward") -> torch.Tensor:
    """A reward's [B] float32 scores (checked); videos go frame by frame (mean) unless the reward handles video."""
    if samples.videos is not None and not getattr(reward, "handles_video", False):
        v = samples.videos
        b, f = v.shape[:2]
        frames = replace(samples, videos=None, images=v.flatten(0, 1),
                         prompts=[p for p in samples.prompts for _ in range(f)],
                         group_ids=[g for g in samples.group_ids for _ in range(f)],
                         metadata=[m for m in samples.metadata for _ in range(f)])
        return score_one(reward, frames, name).view(b, f).mean(1)
    return check_scores(name, reward.score(samples), len(samples))


def _call_with_timeout(fn: Any, timeout: float, name: str, index: int) -> Any:
    """fn() in a daemon worker thread; its result or exception, or a RewardError after `timeout` seconds (the
    call is then abandoned: a thread cannot be stopped from outside)."""
    box: dict[str, Any] = {}
    device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def work() -> None:
        try:
            if device is not None:  # the current CUDA device is per thread: keep this process's
                torch.cuda.set_device(device)
            with torch.no_grad():  # grad mode is per thread too
                box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=work, name=f"flowfactory-reward-{name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise RewardError(
            f"reward {name!r} did not answer within {timeout:g} s (rewards[{index}].timeout); its call was abandoned. "
            f"Raise rewards[{index}].timeout or fix the scorer; no weights were changed this epoch, and "
            f"--resume continues from the last checkpoint.")
    if "error" in box:
        raise box["error"]
    return box["value"]


class RewardSet:
    """The run's rewards: `rewards` is [(name, reward, weight)] in config order; `timeouts` maps a name to its
    per-call limit in seconds (missing or None: no limit)."""

    def __init__(self, rewards: list[tuple[str, Any, float]], timeouts: dict[str, float | None] | None = None):
        self.rewards = rewards
        self.names = [n for n, _, _ in rewards]
        self.weights = {n: w for n, _, w in rewards}
        self.timeouts = {n: (timeouts or {}).get(n) for n in self.names}

    def __len__(self) -> int:
        return len(self.rewards)

    def score(self, samples: Samples) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-reward scores {name: [B] float32 CPU} and their weighted sum."""
        out = {}
        for index, (name, reward, _) in enumerate(self.rewards):
            timeout = self.timeouts[name]
            try:
                if timeout is None:
                    with torch.no_grad():
                        s = score_one(reward, samples, name)
                else:
                    s = _call_with_timeout(lambda r=reward, n=name: score_one(r, samples, n), timeout, name, index)
            except RewardError as exc:
                if str(exc).startswith(f"reward {name!r}"):
                    raise
                raise RewardError(f"reward {name!r}: {exc}") from exc
            except Exception as exc:
                raise RewardError(f"reward {name!r} raised {type(exc).__name__}: {exc}. No weights were "
                                  f"changed this epoch; fix the reward and resume with --resume.") from exc
            s = s.detach().cpu()
            if not torch.isfinite(s).all():
                raise RewardError(f"reward {name!r} returned non-finite scores {s.tolist()}; no weights were "
                                  "changed this epoch.")
            out[name] = s
        total = sum(self.weights[n] * out[n] for n in out)
        return out, total
