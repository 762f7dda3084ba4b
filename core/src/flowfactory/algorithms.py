"""The pieces RL algorithms share, for plugin authors: import this module inside a build function or a loss module
(it imports torch), never from an entry-point module.

- `clip_advantages`: the one advantage clip (core's `train.adv_clip` and an algorithm's own bound use it).
- `clipped_surrogate`: PPO's clipped policy loss per sample, with its `ratio`, `clipfrac` and `approx_kl` metrics.
- `approx_kl`: the metric 0.5 mean((log r)^2), for an algorithm without the clip.
- `shift_times`: the flow-matching time shift of training times; `stratified_times`: K of them, one per stratum.
- `ParamSnapshot`: a copy of the trainable parameters, swapped in on demand (the epoch's sampling policy).
  `flowfactory.train.ema.EMA` extends it with a moving average (an EMA or "old" policy).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["ParamSnapshot", "approx_kl", "clip_advantages", "clipped_surrogate", "shift_times", "stratified_times"]


def clip_advantages(advantages: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Advantages clamped to [-clip, clip] (unchanged for None), in their own dtype."""
    return advantages if clip is None else advantages.clamp(-clip, clip)


def approx_kl(log_ratio: torch.Tensor) -> torch.Tensor:
    """0.5 mean((log r)^2) over the rows, detached: the second-order estimate of KL(old || new) PPO codes log."""
    return (0.5 * log_ratio.detach() ** 2).mean()


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float, *,
                      kl_log_ratio: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate per row, and its metrics.

        r = exp(log_ratio),   loss = max(-A r, -A clip(r, 1 - c, 1 + c))      [B], in the dtype of r and A

    Metrics (detached scalars): `ratio` (mean r), `clipfrac` (share of rows with |r - 1| > c, in r's dtype) and
    `approx_kl` (`approx_kl` of `kl_log_ratio` when given, else of `log_ratio`: GRPO-Guard clips a normalised
    ratio but reports the raw one's KL). The advantages are used as given: clip them first (`clip_advantages`)."""
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    r = ratio.detach()
    metrics = {
        "ratio": r.mean(),
        "clipfrac": ((r - 1.0).abs() > clip_range).to(r.dtype).mean(),
        "approx_kl": approx_kl(log_ratio if kl_log_ratio is None else kl_log_ratio),
    }
    return loss, metrics


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = s t / (1 + (s - 1) t), the usual flow-matching time shift (identity for s = 1)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def stratified_times(k: int, generator: torch.Generator, lo: float = 0.0, hi: float = 1.0,
                     shift: float = 1.0) -> torch.Tensor:
    """[k] float32 training times for one row: one uniform draw in each of k equal strata of [lo, hi), in random
    order (unit j of the row gets the j-th), then shifted (`shift_times`); drawn in float64 from `generator`."""
    u = (torch.arange(k, dtype=torch.float64) + torch.rand(k, generator=generator, dtype=torch.float64)) / k
    u = u[torch.randperm(k, generator=generator)]
    return shift_times(lo + u * (hi - lo), shift).float()


Params = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


def _named(params: Params) -> dict[str, torch.Tensor]:
    """{name: parameter} of named parameters, or of a list keyed by position ("0", "1", ...)."""
    if isinstance(params, Mapping):
        return dict(params)
    if isinstance(params, Sequence) and not isinstance(params, (str, bytes)):
        return {str(i): p for i, p in enumerate(params)}
    raise TypeError(f"parameters must be a dict {{name: tensor}} (flowfactory.train.state.named_trainable) or a "
                    f"list, not {type(params).__name__}")


class ParamSnapshot:
    """A copy of parameters that `swapped(params)` puts in their place for a while (e.g. the policy that sampled
    the epoch, to recompute its log-probs or step means after updates).

    `params` are named parameters (`flowfactory.train.state.named_trainable(policy)`) or a list (keyed by
    position). Each copy is made with `clone` from the parameter as it is, so under FSDP2 it is a DTensor sharded
    like the parameter and a swap copies local shards only: take a snapshot after sharding (`setup`, `on_rollout`).
    Parameters are passed in on every call, never kept, because sharding replaces them. `dtype`: the copies'
    dtype (None: the parameters' own; a swap casts back, which is exact from float32).
    """

    def __init__(self, params: Params, dtype: torch.dtype | None = None):
        self.shadow: dict[str, torch.Tensor] = {
            n: p.detach().clone() if dtype is None else p.detach().to(dtype).clone() for n, p in _named(params).items()}

    def _match(self, params: Params) -> dict[str, torch.Tensor]:
        named = _named(params)
        if named.keys() != self.shadow.keys():
            differ = sorted(set(self.shadow) ^ set(named))[:3]
            raise ValueError(f"{type(self).__name__}: the parameters changed since it was made (e.g. {differ})")
        return named

    @torch.no_grad()
    def copy_from(self, params: Params) -> None:
        """Take the parameters' current values again, in place (no second copy is ever held)."""
        for n, p in self._match(params).items():
            self.shadow[n].copy_(p.detach())

    @classmethod
    def retake(cls, snapshot: ParamSnapshot | None, params: Params) -> ParamSnapshot:
        """`snapshot` refreshed in place from `params`, or a new snapshot of them when it is None: what an
        algorithm's `on_rollout` does to keep the policy that sampled the epoch."""
        if snapshot is None:
            return cls(params)
        snapshot.copy_from(params)
        return snapshot

    @contextmanager
    def swapped(self, params: Params) -> Iterator[None]:
        """Inside, the parameters hold the snapshot; their own values come back after, even on an error. Swap
        before a forward with grad, not between it and its backward: the copies write the parameters in place."""
        named = self._match(params)
        backup = {n: p.detach().clone() for n, p in named.items()}
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in named.items():
                    p.copy_(backup[n])

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["shadow"]
        if not isinstance(saved, dict) or saved.keys() != self.shadow.keys():
            raise ValueError(f"{type(self).__name__} state: the saved names differ from this run's trained parameters")
        with torch.no_grad():
            for n, s in saved.items():
                if s is not self.shadow[n]:
                    self.shadow[n].copy_(s)
