"""The best eval so far, and the guard against reward hacking.

A policy can learn to please the training reward without getting better at what it stands for (reward
hacking). An eval reward the policy never trains on (a "gold" scorer, `eval.rewards`) shows it: the gold metric
falls while the training reward keeps rising. `EvalTracker` follows the `eval.best` metric over evals. It says
when a new best is reached (the loop then writes best/), and stops the run when the metric has stayed more than
`eval.guard.drop` from its best for `patience` evals in a row, each after the best one, while the training metric
(its mean over the epochs since the previous eval) was above its value at the best eval.

Every process keeps its own tracker and feeds it the same (gathered) rows, so all decide alike. On --resume the
tracker is rebuilt from metrics.jsonl up to the resumed epoch, so a resumed run decides as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flowfactory.errors import FlowFactoryError


class RewardHackingError(FlowFactoryError):
    """The reward-hacking guard (or the KL bound) stopped the run; the last epoch is checkpointed and best/ kept."""

    exit_code = 3


@dataclass
class EvalRecord:
    epoch: int
    value: float
    train: float | None  # the training metric's mean over the epochs since the previous eval


@dataclass
class EvalTracker:
    metric: str | None  # eval.best
    mode: str = "max"
    drop: float | None = None  # eval.guard.drop
    patience: int = 2
    train_metric: str = "reward/mean"
    best: EvalRecord | None = None
    evals: list[EvalRecord] = field(default_factory=list)
    pending: list[float] = field(default_factory=list)  # training metric values since the last eval

    @classmethod
    def from_config(cls, cfg: Any) -> EvalTracker:
        e = cfg.eval
        return cls(metric=e.best, mode=e.best_mode, drop=e.guard.drop, patience=e.guard.patience,
                   train_metric=e.guard.train_metric)

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def observe(self, row: dict[str, Any]) -> tuple[bool, str | None]:
        """Feed one epoch's metrics row (in epoch order). Returns (a new best was reached at this eval, why the
        guard stops the run or None)."""
        if self.train_metric in row:
            self.pending.append(float(row[self.train_metric]))
        if self.metric is None or self.metric not in row:
            return False, None
        train = sum(self.pending) / len(self.pending) if self.pending else None
        self.pending = []
        rec = EvalRecord(int(row["epoch"]), float(row[self.metric]), train)
        self.evals.append(rec)
        if self.best is None or self._better(rec.value, self.best.value):
            self.best = rec
            return True, None
        return False, self._hacked()

    def _hacked(self) -> str | None:
        best = self.best
        if self.drop is None or best is None or len(self.evals) < self.patience:
            return None
        last = self.evals[-self.patience:]
        if any(r.epoch <= best.epoch for r in last):
            return None
        fell = all(abs(best.value - r.value) > self.drop and self._better(best.value, r.value) for r in last)
        rose = best.train is not None and all(r.train is not None and r.train > best.train for r in last)
        if not (fell and rose):
            return None
        values = ", ".join(f"{r.value:.4f} (epoch {r.epoch})" for r in last)
        trains = ", ".join(f"{r.train:.4f}" for r in last if r.train is not None)
        return (f"reward hacking suspected: eval metric {self.metric} fell from its best {best.value:.4f} (epoch "
                f"{best.epoch}) to {values}, more than eval.guard.drop = {self.drop:g} for {self.patience} evals, "
                f"while the training metric {self.train_metric} rose from {best.train:.4f} to {trains}. best/ holds "
                f"the weights of epoch {best.epoch}")

    def state(self) -> dict[str, Any]:
        """What the run summary reports."""
        if self.best is None:
            return {}
        return {"metric": self.metric, "value": self.best.value, "epoch": self.best.epoch}


def kl_message(value: float, bound: float, epoch: int) -> str:
    return (f"the estimated KL to the reference policy reached {value:.4g} at epoch {epoch}, above eval.guard.max_kl "
            f"= {bound:g}: the policy has moved far from where it started")
