"""RewardSet.score: the reward contract (float32 [B], finite) checked, never cast; per-reward timeouts."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from flowfactory.errors import RewardError
from flowfactory.plugins import load
from flowfactory.registry import BuildContext
from flowfactory.train.rewards import RewardSet
from flowfactory.types import Samples

PROMPTS = ["a red square", "a blue circle", "a green triangle"]


def samples(n: int = 3) -> Samples:
    return Samples(prompts=PROMPTS[:n], images=torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
                   group_ids=list(range(n)))


def videos(n: int = 2, frames: int = 3) -> Samples:
    return Samples(prompts=PROMPTS[:n], videos=torch.rand(n, frames, 3, 8, 8), group_ids=list(range(n)))


class Returns:
    """A reward whose score is `make(samples)`."""

    groupwise = False
    handles_video = False

    def __init__(self, make):
        self.make = make

    def score(self, samples):
        return self.make(samples)


def brightness_as(dtype: torch.dtype):
    return Returns(lambda s: s.images.mean(dim=(1, 2, 3)).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool])
def test_a_wrong_dtype_is_an_error_naming_the_reward_the_dtype_and_the_fix(dtype) -> None:
    rewards = RewardSet([("judge", brightness_as(dtype), 1.0)])
    with pytest.raises(RewardError) as exc:
        rewards.score(samples())
    assert str(exc.value) == (f"reward 'judge' returned {dtype} scores; rewards return float32 [B] (docs/hooks.md): "
                              "end its score() with `return scores.float()`")


def test_float32_scores_pass_unchanged_and_are_weighted() -> None:
    s = samples()
    rewards = RewardSet([("a", brightness_as(torch.float32), 2.0), ("b", Returns(lambda x: torch.ones(3)), -0.5)])
    per, total = rewards.score(s)
    expected = s.images.mean(dim=(1, 2, 3))
    assert per["a"].dtype == torch.float32 and torch.equal(per["a"], expected)
    torch.testing.assert_close(total, 2.0 * expected - 0.5)


def test_video_frames_are_checked_before_their_mean() -> None:
    """An integer per-frame score is the dtype error, not torch's complaint about the mean of a long tensor."""
    rewards = RewardSet([("counter", Returns(lambda s: torch.ones(len(s), dtype=torch.int64)), 1.0)])
    with pytest.raises(RewardError, match=r"reward 'counter' returned torch.int64 scores; .*`return scores.float\(\)`"):
        rewards.score(videos())
    per, _ = RewardSet([("ok", Returns(lambda s: torch.arange(len(s), dtype=torch.float32)), 1.0)]).score(videos())
    torch.testing.assert_close(per["ok"], torch.tensor([1.0, 4.0]))  # frames 0..2 and 3..5, averaged


@pytest.mark.parametrize(("make", "text"), [
    (lambda s: [0.0] * len(s), "returned list; expected a tensor of shape (3,)"),
    (lambda s: torch.zeros(len(s), 1), "returned (3, 1); expected a tensor of shape (3,)"),
    (lambda s: torch.tensor([0.0, float("nan"), 1.0]), "returned non-finite scores [0.0, nan, 1.0]"),
])
def test_shape_and_finiteness_are_still_checked(make, text) -> None:
    with pytest.raises(RewardError, match="reward 'r' " + text.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        RewardSet([("r", Returns(make), 1.0)]).score(samples())


def test_builtin_rewards_return_float32_through_the_set() -> None:
    registry = load(strict=True).registry
    names = ["brightness", "colour-match", "jpeg-compressibility", "jpeg-incompressibility"]
    rewards = RewardSet([(n, registry.get("reward", n).create({}, BuildContext(seed=0)), 1.0) for n in names])
    per, total = rewards.score(samples())
    assert list(per) == names
    assert all(v.dtype == torch.float32 and v.shape == (3,) for v in per.values())
    assert total.dtype == torch.float32


def test_a_reward_error_from_the_reward_is_prefixed_once() -> None:
    def fail(s):
        raise RewardError("the prompt names no colour")

    with pytest.raises(RewardError) as exc:
        RewardSet([("colour", Returns(fail), 1.0)]).score(samples())
    assert str(exc.value) == "reward 'colour': the prompt names no colour"


# --- timeouts --------------------------------------------------------------------------------------------------

class Hangs:
    """Blocks in score() until released (a judge that never answers), then scores like brightness."""

    groupwise = False
    handles_video = False

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()

    def score(self, samples):
        self.started.set()
        self.release.wait(30)
        return samples.images.mean(dim=(1, 2, 3))


def test_a_reward_that_hangs_past_its_timeout_stops_with_a_reward_error() -> None:
    hang = Hangs()
    rewards = RewardSet([("brightness", brightness_as(torch.float32), 1.0), ("judge", hang, 1.0)],
                        timeouts={"judge": 0.5})
    t0 = time.perf_counter()
    try:
        with pytest.raises(RewardError) as exc:
            rewards.score(samples())
        waited = time.perf_counter() - t0
        assert 0.5 <= waited < 5.0
        assert str(exc.value) == (
            "reward 'judge' did not answer within 0.5 s (rewards[1].timeout); its call was abandoned. Raise "
            "rewards[1].timeout or fix the scorer; no weights were changed this epoch, and --resume continues from "
            "the last checkpoint.")
        assert hang.started.is_set()
        abandoned = [t for t in threading.enumerate() if t.name == "flowfactory-reward-judge"]
        assert abandoned and all(t.daemon for t in abandoned)  # it cannot keep the process alive at exit
    finally:
        hang.release.set()


def test_a_reward_within_its_timeout_scores_as_without_one() -> None:
    s = samples()
    plain = RewardSet([("b", brightness_as(torch.float32), 1.0)]).score(s)
    timed = RewardSet([("b", brightness_as(torch.float32), 1.0)], timeouts={"b": 5.0}).score(s)
    assert torch.equal(plain[0]["b"], timed[0]["b"]) and torch.equal(plain[1], timed[1])


def test_under_a_timeout_errors_and_checks_reach_the_caller() -> None:
    def fail(s):
        raise ConnectionError("judge unreachable")

    with pytest.raises(RewardError, match=r"reward 'j' raised ConnectionError: judge unreachable\. No weights"):
        RewardSet([("j", Returns(fail), 1.0)], timeouts={"j": 5.0}).score(samples())
    with pytest.raises(RewardError, match=r"reward 'j' returned torch.float64 scores"):
        RewardSet([("j", brightness_as(torch.float64), 1.0)], timeouts={"j": 5.0}).score(samples())


def test_the_worker_scores_without_grad() -> None:
    seen = []
    w = torch.ones(1, requires_grad=True)

    def score(s):
        seen.append(torch.is_grad_enabled())
        return (s.images.mean(dim=(1, 2, 3)) * w).float()

    per, _ = RewardSet([("g", Returns(score), 1.0)], timeouts={"g": 5.0}).score(samples())
    assert seen == [False] and not per["g"].requires_grad
