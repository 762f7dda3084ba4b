"""SFT: the flow-matching loss and its gradient against the formula written out here (computed from the toy
network directly), draws keyed by the rows, stratified times, options, and the optimizer contract suite."""

from __future__ import annotations

import pydantic
import pytest
import torch

from flowfactory.registry import BuildContext
from flowfactory.seeding import sample_seed
from flowfactory.testing import OptimizerContract, load_registry
from flowfactory.types import TrainBatch, Trajectory
from flowfactory_sft import SFTOptions
from flowfactory_sft.loss import _STREAM, SFT

N = 4


class TestSFTContract(OptimizerContract):
    component = "sft"
    options = {"num_times": 2}


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture
def policy(registry):
    return registry.get("policy", "toy").create({"size": 8, "hidden": 16}, BuildContext(seed=0))


def batch(policy) -> TrainBatch:
    x0 = torch.rand(N, *policy.latent_shape, generator=torch.Generator().manual_seed(3)) * 2 - 1
    traj = Trajectory(sigmas=policy.sigmas(4), stochastic=torch.zeros(4, dtype=torch.bool), final=x0)
    cond = policy.encode(["a red square", "a blue circle", "a red square", "a green cat"])
    return TrainBatch(trajectory=traj, cond=cond, advantages=torch.ones(N), fresh=True,
                      sample_keys=tuple((1, 0, 20 + i) for i in range(N)))


def test_loss_and_gradient_equal_the_flow_matching_formula(policy) -> None:
    sft = SFT(SFTOptions(num_times=3, time_shift=2.0), seed=7)
    b = batch(policy)
    units = sft.units(b)
    assert len(units) == 3
    for unit in units:
        policy.module.zero_grad()
        out = sft.loss(policy, None, b, unit)
        out.loss.mean().backward()
        got = [p.grad.clone() for p in policy.trainable_parameters()]
        # independent: x_t = (1 - t) x0 + t eps with eps drawn from the row's seed, target eps - x0
        policy.module.zero_grad()
        x0 = b.trajectory.final
        eps = torch.stack([torch.randn(*x0.shape[1:], generator=torch.Generator().manual_seed(s))
                           for s in unit.noise_seeds])
        t = unit.times
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        v = policy.module(x_t, t, b.cond["text"])
        want = ((v - (eps - x0)) ** 2).mean(dim=(1, 2, 3))
        want.mean().backward()
        torch.testing.assert_close(out.loss, want.detach(), atol=1e-6, rtol=1e-6)
        for g, p in zip(got, policy.trainable_parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)
        assert set(out.metrics) == {"sft/mse", "sft/t"}


def test_times_are_stratified_shifted_and_keyed_by_row(policy) -> None:
    sft = SFT(SFTOptions(num_times=4, time_shift=3.0), seed=7)
    b = batch(policy)
    times = torch.stack([u.times for u in sft.units(b)])  # [K, B]
    for row in range(N):
        u = times[:, row].double()
        raw = u / (3.0 - 2.0 * u)  # inverse of t <- s t / (1 + (s - 1) t) with s = 3
        assert sorted((raw * 4).floor().long().tolist()) == [0, 1, 2, 3]  # one time in each quarter
    assert sft.units(b)[0].noise_seeds[1] == sample_seed(7, _STREAM, 1, 0, 21, 1)
    # the same row in another micro-batch draws the same time and noise
    half = TrainBatch(trajectory=b.trajectory.select(slice(2, 4)), cond={"text": b.cond["text"][2:]},
                      advantages=torch.ones(2), fresh=True, sample_keys=b.sample_keys[2:])
    assert torch.equal(sft.units(half)[1].times, sft.units(b)[1].times[2:])


def test_options_are_checked() -> None:
    with pytest.raises(pydantic.ValidationError, match="time_min must be below time_max"):
        SFTOptions(time_min=0.5, time_max=0.5)
    with pytest.raises(pydantic.ValidationError):
        SFTOptions(num_times=0)
    assert SFT(SFTOptions(), seed=0).requirements.source == "dataset"
    assert SFT(SFTOptions(), seed=0).requirements.targets == ("target",)
