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
                         metadata=[m for m in samples.metadata for _ in range(f)],
                         inputs=[r for r in samples.inputs for _ in range(f)])
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


class ChunkScorer:
    """Scores an epoch's decoded rows chunk by chunk while the rollout goes on.

    Rows arrive in order (`add`) as the rollout decodes them. Every `chunk` rows (a multiple of the group size:
    a groupwise reward always gets whole groups, since each process's rows start on a group boundary) form one
    scoring call of the run's `RewardSet`. With `overlap`, calls run in one worker thread, so chunk k is scored
    while chunk k+1 samples; without it they run inline. The chunks, hence the scores, are the same either way.
    `failed()` says whether a call already raised (the rollout can stop early); `result()` waits for every call
    and returns the scores of all rows in order, or raises the first call's error.
    """

    def __init__(self, rewards: RewardSet, prompts: list[Any], group_ids: list[int], chunk: int, *,
                 overlap: bool, samples: Any = None):
        self.rewards, self.prompts, self.group_ids = rewards, prompts, group_ids
        self.chunk = max(1, chunk)
        self.make_samples = samples  # (prompts, group_ids, media) -> Samples; default: images or videos by ndim
        self.pending: list[torch.Tensor] = []
        self.n_pending = self.n_sent = 0
        self.results: list[Any] = []
        self.pool = None
        if overlap:
            from concurrent.futures import ThreadPoolExecutor

            device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
            # the current CUDA device is per thread: the worker scores on this process's device
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="flowfactory-score",
                                           initializer=(lambda: torch.cuda.set_device(device)) if device is not None
                                           else None)

    def _samples(self, lo: int, hi: int, media: torch.Tensor) -> Samples:
        if self.make_samples is not None:
            return self.make_samples(self.prompts[lo:hi], self.group_ids[lo:hi], media)
        key = "videos" if media.ndim == 5 else "images"
        return Samples.of(self.prompts[lo:hi], group_ids=self.group_ids[lo:hi], **{key: media})

    def add(self, media: torch.Tensor) -> None:
        """The next decoded rows, in order; complete chunks are sent for scoring."""
        self.pending.append(media)
        self.n_pending += media.shape[0]
        while self.n_pending >= self.chunk:
            self._send(self.chunk)

    def _send(self, n: int) -> None:
        rows = torch.cat(self.pending) if len(self.pending) > 1 else self.pending[0]
        part, rest = rows[:n], rows[n:]
        self.pending, self.n_pending = ([rest] if rest.shape[0] else []), rest.shape[0]
        samples = self._samples(self.n_sent, self.n_sent + n, part)
        self.n_sent += n
        if self.pool is None:
            try:
                self.results.append(self.rewards.score(samples))
            except BaseException as exc:
                self.results.append(exc)
        else:
            self.results.append(self.pool.submit(self.rewards.score, samples))

    def failed(self) -> bool:
        """Whether a call has already raised (the rest of the rollout can be skipped)."""
        return any(isinstance(r, BaseException) or (hasattr(r, "done") and r.done() and r.exception() is not None)
                   for r in self.results)

    def result(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-reward scores {name: [N] float32 CPU} and the weighted total, over every row added."""
        try:
            if self.n_pending:
                self._send(self.n_pending)
            outs = []
            for r in self.results:
                value = r.result() if hasattr(r, "result") else r
                if isinstance(value, BaseException):
                    raise value
                outs.append(value)
        finally:
            self.close()
        per_reward = {name: torch.cat([o[0][name] for o in outs]) for name in self.rewards.names}
        return per_reward, torch.cat([o[1] for o in outs])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
