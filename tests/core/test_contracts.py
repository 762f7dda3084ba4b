"""The contract suites of `flowfactory.testing`, run on the built-in components and on inline examples.

The built-ins (samplers, rewards, the `toy` policy) must pass the suites that plugin authors use. The
optimizer suite runs on two small inline algorithms registered as an inline plugin. The last tests run
the suites on deliberately broken components (with pytest's `pytester`) to show that each contract
catches the fault it is about, and only that one.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from flowfactory import hookimpl
from flowfactory.errors import FlowFactoryError
from flowfactory.registry import BuildContext
from flowfactory.testing import (
    OptimizerContract,
    PolicyContract,
    RewardContract,
    SamplerContract,
    load_registry,
)
from flowfactory.types import LossOutput, OptimizerHooks, Policy, Requirements, Sampler, TrainBatch

pytest_plugins = ["pytester"]


# --- two inline example algorithms, registered the way a plugin package would ------------------------------

class PGOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = Field(1.0, gt=0, description="Multiplies the loss.")


class PolicyGradientExample(OptimizerHooks):
    """REINFORCE over SDE steps: loss = -scale * advantage * log-prob, one unit per stochastic step."""

    requirements = Requirements(keep="steps", stochastic=True)

    def __init__(self, options: PGOptions):
        self.scale = options.scale

    def setup(self, policy: Policy, sampler: Sampler) -> None:
        if not sampler.stochastic:
            raise FlowFactoryError("example-pg needs log-probabilities: use a stochastic sampler such as flow-sde")

    def units(self, batch: TrainBatch) -> list[int]:
        return batch.trajectory.stochastic_steps()

    def loss(self, policy: Policy, sampler: Sampler, batch: TrainBatch, unit: int) -> LossOutput:
        dist = sampler.log_prob(policy, batch.trajectory, unit, batch.cond)
        loss = -self.scale * batch.advantages * dist.log_prob
        max_metrics = {}
        if batch.fresh:
            max_metrics["logprob/agreement"] = (dist.log_prob - batch.trajectory.log_probs[:, unit]).abs().max().detach()
        return LossOutput(loss=loss, metrics={"pg/log_prob": dist.log_prob.mean().detach()}, max_metrics=max_metrics)


class WeightedFlowMatchingExample(OptimizerHooks):
    """Flow-matching regression on final samples, weighted by sigmoid(advantage): an ODE-rollout algorithm.

    It draws the regression noise from torch's global RNG for the whole micro-batch, so a row's loss
    depends on its companions (`rows_independent = False` in its contract)."""

    requirements = Requirements(keep="final", stochastic=False)

    def __init__(self, options: Any):
        pass

    def setup(self, policy: Policy, sampler: Sampler) -> None:
        return None

    def units(self, batch: TrainBatch) -> list[float]:
        return [0.25, 0.75]  # the noise levels regressed at

    def loss(self, policy: Policy, sampler: Sampler, batch: TrainBatch, unit: float) -> LossOutput:
        x0 = batch.trajectory.final.float()
        eps = torch.randn_like(x0)
        xt = (1 - unit) * x0 + unit * eps
        v = policy.velocity(xt, torch.full((x0.shape[0],), unit), batch.cond)
        err = ((v - (eps - x0)) ** 2).flatten(1).mean(1)
        loss = torch.sigmoid(batch.advantages) * err
        return LossOutput(loss=loss, metrics={"fm/err": err.mean().detach()})


class ExampleOptimizers:
    """An inline plugin, as `ff` would load it from an entry point."""

    @hookimpl
    def register_optimizers(self, register: Any) -> None:
        register("example-pg", lambda options, ctx: PolicyGradientExample(options), options=PGOptions,
                 summary="REINFORCE example.")
        register("example-fm", lambda options, ctx: WeightedFlowMatchingExample(options),
                 summary="Advantage-weighted flow matching example.")


EXAMPLES = ((ExampleOptimizers(), "example-optimizers", "0"),)


# --- samplers -----------------------------------------------------------------------------------------------

class TestODEContract(SamplerContract):
    component = "ode"
    options = {"steps": 5}
    stochastic = False


class TestFlowSDEContract(SamplerContract):
    component = "flow-sde"
    options = {"steps": 6}


class TestFlowSDEWindowContract(SamplerContract):
    component = "flow-sde"
    options = {"steps": 8, "sde_window_size": 2}
    epochs = (0, 1, 2, 3, 4)


class TestFlowSDEStochasticLastStepContract(SamplerContract):
    component = "flow-sde"
    options = {"steps": 5, "deterministic_last_step": False, "noise_level": 1.0}
    policy_options = {"size": 8, "hidden": 16, "shift": 3.0}  # a non-uniform schedule


class TestDanceSDEContract(SamplerContract):
    component = "dance-sde"
    options = {"steps": 6}


class TestDanceSDEWindowStochasticLastStepContract(SamplerContract):
    component = "dance-sde"
    options = {"steps": 6, "sde_window_size": 3, "sde_window_range": (2, 4), "deterministic_last_step": False,
               "eta": 0.6}
    policy_options = {"size": 8, "hidden": 16, "shift": 3.0}
    epochs = (0, 1, 2, 3)


class TestCPSContract(SamplerContract):
    component = "cps"
    options = {"steps": 6}


class TestCPSWindowContract(SamplerContract):
    component = "cps"
    options = {"steps": 8, "sde_window_size": 2, "noise_level": 1.0}
    policy_options = {"size": 8, "hidden": 16, "shift": 3.0}
    epochs = (0, 1, 2, 3, 4)


# --- rewards ------------------------------------------------------------------------------------------------

class TestColourMatchContract(RewardContract):
    component = "colour-match"


class TestColourMatchDefaultContract(RewardContract):
    component = "colour-match"
    options = {"default": "grey", "tolerance": 0.5}
    prompts = ("a square", "a purple circle")  # the first names no colour: the default applies


class TestBrightnessContract(RewardContract):
    component = "brightness"


class TestJPEGCompressibilityContract(RewardContract):
    component = "jpeg-compressibility"


class TestJPEGIncompressibilityContract(RewardContract):
    component = "jpeg-incompressibility"
    options = {"quality": 50}


# --- the toy policy -----------------------------------------------------------------------------------------

class TestToyPolicyContract(PolicyContract):
    component = "toy"
    options = {"size": 8, "hidden": 16}


class TestShiftedToyPolicyContract(PolicyContract):
    component = "toy"
    options = {"size": 6, "hidden": 8, "shift": 3.0}
    prompts = ("a red square", "a blue circle", "a green triangle")
    steps = 7
    seed = 3


# --- optimizers ---------------------------------------------------------------------------------------------

class TestPolicyGradientContract(OptimizerContract):
    component = "example-pg"
    options = {"scale": 2.0}
    extra_plugins = EXAMPLES


class TestPolicyGradientWindowContract(OptimizerContract):
    component = "example-pg"
    extra_plugins = EXAMPLES
    sampler_steps = 6
    sampler_options = {"sde_window_size": 2}


class TestPolicyGradientDanceSDEContract(OptimizerContract):
    """A log-prob algorithm runs unchanged on DanceGRPO's SDE."""

    component = "example-pg"
    extra_plugins = EXAMPLES
    sampler_steps = 5

    @classmethod
    def sampler_name(cls, requirements: Requirements) -> str:
        return "dance-sde"


class TestPolicyGradientCPSContract(OptimizerContract):
    """A log-prob algorithm runs unchanged on coefficients-preserving sampling, in an SDE window."""

    component = "example-pg"
    extra_plugins = EXAMPLES
    sampler_steps = 6
    sampler_options = {"sde_window_size": 2, "noise_level": 0.5}

    @classmethod
    def sampler_name(cls, requirements: Requirements) -> str:
        return "cps"


class TestWeightedFlowMatchingContract(OptimizerContract):
    component = "example-fm"
    extra_plugins = EXAMPLES
    rows_independent = False


def test_optimizer_suite_rolls_out_with_the_required_sampler() -> None:
    """The suite hands an SDE rollout with per-step log-probs to an algorithm that asks for one, and a
    final-only ODE rollout to one that does not."""
    registry = load_registry(EXAMPLES, entry_points=False)
    for cls, sampler_type, keeps_steps in ((TestPolicyGradientContract, "FlowSDESampler", True),
                                           (TestWeightedFlowMatchingContract, "ODESampler", False)):
        algo = cls.build(registry)
        sampler = cls.make_sampler(registry, cls.sampler_name(algo.requirements), cls.sampler_options)
        assert type(sampler).__name__ == sampler_type
        assert sampler.steps == cls.sampler_steps
        policy = registry.get("policy", "toy").create(dict(cls.policy_options), BuildContext(seed=0))
        batch = cls.make_batch(algo, policy, sampler)
        n = len(cls.prompts) * cls.group_size
        assert len(batch.trajectory) == n and tuple(batch.advantages.shape) == (n,)
        assert (batch.trajectory.latents is not None) is keeps_steps
        assert bool(batch.trajectory.stochastic.any()) is keeps_steps


# --- the suites catch broken components ---------------------------------------------------------------------

BROKEN = '''
import torch
from flowfactory import hookimpl
from flowfactory.errors import FlowFactoryError
from flowfactory.samplers import FlowSDEOptions
from flowfactory.samplers.flow import FlowSDESampler
from flowfactory.testing import OptimizerContract, PolicyContract, RewardContract, SamplerContract
from flowfactory.testing.toy import ToyPolicy
from flowfactory.types import LossOutput, OptimizerHooks, Requirements
from contextlib import contextmanager


class OffByOneThousandth(FlowSDESampler):
    """Recomputed log-probs disagree with the rollout's."""
    def log_prob(self, policy, trajectory, step, cond):
        dist = super().log_prob(policy, trajectory, step, cond)
        dist.log_prob = dist.log_prob + 1e-3
        return dist


class NoFrozenReference(ToyPolicy):
    """reference() follows training instead of staying at the initial weights."""
    @contextmanager
    def reference(self):
        with torch.no_grad():
            yield


class ScalarLoss(OptimizerHooks):
    """Averages the loss itself and detaches it."""
    requirements = Requirements(keep="steps", stochastic=True)
    def setup(self, policy, sampler):
        if not sampler.stochastic:
            raise FlowFactoryError("needs a stochastic sampler")
    def units(self, batch):
        return batch.trajectory.stochastic_steps()
    def loss(self, policy, sampler, batch, unit):
        with torch.no_grad():
            lp = sampler.log_prob(policy, batch.trajectory, unit, batch.cond).log_prob
        return LossOutput(loss=(-batch.advantages * lp).mean())


class Float64Reward:
    groupwise = False
    handles_video = False
    def score(self, samples):
        return samples.images.double().mean(dim=(1, 2, 3))


class Broken:
    @hookimpl
    def register_samplers(self, register):
        register("broken-sde", lambda o, ctx: OffByOneThousandth(o, seed=ctx.seed), options=FlowSDEOptions)

    @hookimpl
    def register_policies(self, register):
        register("broken-toy", lambda o, ctx: NoFrozenReference(seed=ctx.seed, size=6, hidden=8))

    @hookimpl
    def register_optimizers(self, register):
        register("broken-pg", lambda o, ctx: ScalarLoss())

    @hookimpl
    def register_rewards(self, register):
        register("broken-reward", lambda o, ctx: Float64Reward())


PLUGINS = ((Broken(), "broken", "0"),)


class TestBrokenSampler(SamplerContract):
    component = "broken-sde"
    options = {"steps": 4}
    extra_plugins = PLUGINS


class TestBrokenPolicy(PolicyContract):
    component = "broken-toy"
    extra_plugins = PLUGINS


class TestBrokenOptimizer(OptimizerContract):
    component = "broken-pg"
    extra_plugins = PLUGINS


class TestBrokenReward(RewardContract):
    component = "broken-reward"
    extra_plugins = PLUGINS
'''


@pytest.fixture
def broken_run(pytester: pytest.Pytester) -> dict[str, dict[str, set[str]]]:
    """Run the suites on the broken components; class name -> outcome -> test names."""
    pytester.makepyfile(test_broken=BROKEN)
    rec = pytester.inline_run("-p", "no:cacheprovider")
    out: dict[str, dict[str, set[str]]] = {}
    for report in rec.getreports("pytest_runtest_logreport"):
        if report.when != "call" and not (report.failed or report.skipped):
            continue
        cls, name = report.nodeid.split("::")[1:3]
        outcome = "failed" if report.failed else "skipped" if report.skipped else "passed"
        out.setdefault(cls, {}).setdefault(outcome, set()).add(name)
    return out


def test_suites_catch_exactly_the_broken_contract(broken_run: dict[str, dict[str, set[str]]]) -> None:
    assert broken_run["TestBrokenSampler"].get("failed") == {"test_log_prob_agrees_with_rollout"}
    assert broken_run["TestBrokenPolicy"].get("failed") == {"test_reference_is_the_initial_policy"}
    assert broken_run["TestBrokenOptimizer"].get("failed") == {
        "test_loss_is_per_sample_and_finite", "test_loss_reaches_trainable_parameters", "test_micro_batches"}
    assert broken_run["TestBrokenReward"].get("failed") == {
        "test_scores_are_float32_per_sample", "test_scores_do_not_depend_on_other_rows"}
    # Everything else of each suite still passes: a suite points at the fault, not at everything.
    for cls in ("TestBrokenSampler", "TestBrokenPolicy", "TestBrokenOptimizer", "TestBrokenReward"):
        assert len(broken_run[cls].get("passed", set())) >= 3, broken_run[cls]


def test_contract_without_a_component_says_so() -> None:
    class TestUnnamed(SamplerContract):
        pass

    with pytest.raises(TypeError, match="must set `component`"):
        TestUnnamed.build(load_registry(entry_points=False))
