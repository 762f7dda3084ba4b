"""Scoring several rewards and combining them; a reward that misbehaves stops the run before any update."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from flowfactory.errors import RewardError
from flowfactory.types import Samples


def score_one(reward: Any, samples: Samples) -> torch.Tensor:
    """A reward's [B] float32 scores; videos go frame by frame (mean) unless the reward handles video."""
    if samples.videos is not None and not getattr(reward, "handles_video", False):
        v = samples.videos
        b, f = v.shape[:2]
        frames = replace(samples, videos=None, images=v.flatten(0, 1),
                         prompts=[p for p in samples.prompts for _ in range(f)],
                         group_ids=[g for g in samples.group_ids for _ in range(f)],
                         metadata=[m for m in samples.metadata for _ in range(f)])
        return score_one(reward, frames).view(b, f).mean(1)
    return reward.score(samples)


class RewardSet:
    def __init__(self, rewards: list[tuple[str, Any, float]]):
        self.rewards = rewards
        self.names = [n for n, _, _ in rewards]
        self.weights = {n: w for n, _, w in rewards}

    def __len__(self) -> int:
        return len(self.rewards)

    def score(self, samples: Samples) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-reward scores {name: [B] float32 CPU} and their weighted sum."""
        out = {}
        for name, reward, _ in self.rewards:
            try:
                with torch.no_grad():
                    s = score_one(reward, samples)
            except RewardError as exc:
                raise RewardError(f"reward {name!r}: {exc}") from exc
            except Exception as exc:
                raise RewardError(f"reward {name!r} raised {type(exc).__name__}: {exc}. No weights were "
                                  f"changed this epoch; fix the reward and resume with --resume.") from exc
            if not isinstance(s, torch.Tensor) or s.shape != (len(samples),):
                shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise RewardError(f"reward {name!r} returned {shape}; expected a tensor of shape ({len(samples)},)")
            s = s.detach().float().cpu()
            if not torch.isfinite(s).all():
                raise RewardError(f"reward {name!r} returned non-finite scores {s.tolist()}; no weights were "
                                  "changed this epoch.")
            out[name] = s
        total = sum(self.weights[n] * out[n] for n in out)
        return out, total
