"""The differentiable CLIP rewards (reward back-propagation, `draft`): the gradient of the scores to the images
is finite, nonzero and equals a central finite difference; pickscore-rank says it is not differentiable."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from flowfactory.types import Samples

PROMPTS = ["a red square", "a blue circle on a white field"]


def images() -> torch.Tensor:
    """Two 12x12 images in [0.2, 0.8]: upsampled to the processor's 24 without touching its clamps to [0, 1]."""
    g = torch.Generator().manual_seed(0)
    return 0.2 + 0.6 * torch.rand(2, 3, 12, 12, generator=g)


@pytest.mark.parametrize("name", ["pickscore", "clip-score", "aesthetic", "hpsv2"])
def test_gradient_to_the_images_equals_finite_differences(make_reward: Any, name: str) -> None:
    reward = make_reward(name)
    assert type(reward).differentiable is True
    x = images().requires_grad_(True)
    scores = reward.score(Samples(prompts=PROMPTS, images=x, group_ids=[0, 1]))
    with torch.no_grad():
        assert torch.equal(scores.detach(), reward.score(Samples(prompts=PROMPTS, images=x.detach(), group_ids=[0, 1])))
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) > 0
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    direction /= direction.norm()
    analytic = float((grad * direction).sum())
    h = 1e-2

    def total(scale: float) -> float:
        with torch.no_grad():
            shifted = x.detach() + scale * direction
            return float(reward.score(Samples(prompts=PROMPTS, images=shifted, group_ids=[0, 1])).double().sum())

    numeric = (total(h) - total(-h)) / (2 * h)
    assert numeric == pytest.approx(analytic, rel=2e-2, abs=1e-4)


def test_images_without_grad_build_no_graph(make_reward: Any) -> None:
    """Grad mode on but images that do not require grad (as at eval): the scores carry no graph."""
    scores = make_reward("pickscore").score(Samples(prompts=PROMPTS, images=images(), group_ids=[0, 1]))
    assert not scores.requires_grad


def test_pickscore_rank_is_not_differentiable(make_reward: Any) -> None:
    assert type(make_reward("pickscore-rank")).differentiable is False
