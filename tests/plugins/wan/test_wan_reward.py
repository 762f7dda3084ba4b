"""Videos through the loop's scoring: a per-image reward scores a video as the mean over its frames."""

from __future__ import annotations

import torch

from flowfactory.plugins import load
from flowfactory.registry import BuildContext
from flowfactory.samplers.flow import ODESampler
from flowfactory.train.rewards import RewardSet
from flowfactory.types import Samples

PROMPTS = ["a red square", "a blue circle"]


def test_video_reward_is_the_mean_over_frames(make_policy, gens) -> None:
    policy = make_policy(lora={"rank": 2})
    registry = load(strict=True).registry
    traj = ODESampler(2).rollout(policy, policy.encode(PROMPTS), policy.noise(gens(2)), gens(2), keep="final",
                                 deterministic=True)
    videos = policy.decode(traj.final)
    assert videos.shape == (2, 5, 3, 16, 16) and videos.dtype == torch.float32
    rewards = RewardSet([(name, registry.get("reward", name).create({}, BuildContext(seed=0)), 1.0)
                         for name in ("brightness", "colour-match")])
    per_reward, total = rewards.score(Samples(prompts=PROMPTS, videos=videos, group_ids=[0, 1]))
    for name, reward, _ in rewards.rewards:
        assert not reward.handles_video
        frames = Samples(prompts=[p for p in PROMPTS for _ in range(5)], images=videos.flatten(0, 1),
                         group_ids=[g for g in (0, 1) for _ in range(5)])
        expected = reward.score(frames).view(2, 5).mean(1)
        torch.testing.assert_close(per_reward[name], expected)
    assert total.shape == (2,)
