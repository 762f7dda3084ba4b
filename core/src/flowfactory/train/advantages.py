"""Advantages, computed once in core for every algorithm.

Rewards of rollouts that share a prompt form a group; an advantage is the reward minus its group's mean,
divided by the group's std, the std over all rollouts ("global"), or 1 ("none"), then clipped.
Several rewards are combined either before normalising (`sum`: weighted sum of the rewards), or after
(`group-normalize`: weighted sum of each reward's normalised advantage, so a reward's scale does not drown the
others), or as GDPO does (`gdpo`, Liu et al. 2026, arXiv 2601.05242: each reward normalised within its group,
the weighted sum, then that sum normalised over the whole batch, so its range does not grow with the number of
rewards).
"""

from __future__ import annotations

from typing import Literal

import torch

from flowfactory.algorithms import clip_advantages

EPS = 1e-4


def group_normalize(r: torch.Tensor, group_ids: torch.Tensor, std: Literal["group", "global", "none"] = "group",
                    eps: float = EPS) -> torch.Tensor:
    """(r - mean of its group) / scale, with population std (ddof=0)."""
    r = r.double()
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1
    counts = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
    means = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, r) / counts
    centred = r - means[inv]
    if std == "group":
        var = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, centred**2) / counts
        scale = var.sqrt()[inv]
    elif std == "global":
        scale = r.std(unbiased=False).expand_as(r)
    else:
        return centred.float()
    return (centred / (scale + eps)).float()


def compute_advantages(
    rewards: dict[str, torch.Tensor],
    weights: dict[str, float],
    group_ids: torch.Tensor,
    *,
    std: Literal["group", "global", "none"] = "group",
    clip: float | None = 5.0,
    combine: Literal["sum", "group-normalize", "gdpo"] = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (advantages [N] float32, combined reward [N] float32). `rewards` and `group_ids` cover the whole
    global batch (every process's samples)."""
    total = sum(weights[k] * rewards[k].double() for k in rewards).float()
    if combine == "sum":
        adv = group_normalize(total, group_ids, std)
    else:
        adv = sum(weights[k] * group_normalize(rewards[k], group_ids, std) for k in rewards)
        if combine == "gdpo":
            adv = adv.double()
            adv = ((adv - adv.mean()) / (adv.std(unbiased=False) + EPS)).float()
    return clip_advantages(adv, clip).float(), total
