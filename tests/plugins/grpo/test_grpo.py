"""GRPO's loss against a hand computation of Flow-GRPO's objective."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch

from flowfactory import hookimpl
from flowfactory.errors import FlowFactoryError
from flowfactory.plugins import load
from flowfactory.registry import BuildContext
from flowfactory.types import StepDistribution, TrainBatch, Trajectory


def build(**options):
    return load(strict=True).registry.get("optimizer", "grpo").create(options, BuildContext())


class FixedSampler:
    """A sampler double whose step distribution is given: mean = x * w (w carries the grad)."""

    stochastic = True

    def __init__(self, new_log_prob: torch.Tensor, std: float):
        self.w = torch.nn.Parameter(torch.ones(()))
        self.new_log_prob = new_log_prob
        self.std = std
        self.ref_mean_scale = 0.5

    def step_distribution(self, policy, x, sigmas, i, cond, stochastic=True):
        scale = self.ref_mean_scale if policy.in_reference else self.w
        return StepDistribution(mean=x * scale, std=torch.tensor(self.std))

    def log_prob(self, policy, trajectory, step, cond):
        d = self.step_distribution(policy, trajectory.latents[:, step], trajectory.sigmas, step, cond)
        d.log_prob = self.new_log_prob * self.w
        return d


class DoublePolicy:
    in_reference = False

    @contextmanager
    def reference(self):
        self.in_reference = True
        try:
            yield
        finally:
            self.in_reference = False


def make_batch(old: torch.Tensor, adv: torch.Tensor, fresh: bool = True) -> TrainBatch:
    b = old.shape[0]
    latents = torch.arange(b * 3 * 4, dtype=torch.float32).view(b, 3, 4) / 10
    log_probs = torch.zeros(b, 2)
    log_probs[:, 0] = old
    traj = Trajectory(sigmas=torch.tensor([1.0, 0.5, 0.0]), stochastic=torch.tensor([True, False]),
                      final=latents[:, -1], latents=latents, log_probs=log_probs)
    return TrainBatch(trajectory=traj, cond={}, advantages=adv, fresh=fresh)


def hand_loss(new, old, adv, clip, adv_clip):
    out = []
    for n, o, a in zip(new.tolist(), old.tolist(), adv.tolist()):
        a = max(-adv_clip, min(adv_clip, a))
        r = math.exp(n - o)
        out.append(max(-a * r, -a * min(max(r, 1 - clip), 1 + clip)))
    return torch.tensor(out)


@pytest.mark.parametrize("clip", [1e-4, 0.2])
def test_clipped_objective_matches_hand_computation(clip):
    old = torch.tensor([-1.0, -1.0, -0.5, -2.0])
    new = torch.tensor([-0.9, -1.3, -0.5, -2.00001])
    adv = torch.tensor([1.5, -2.0, 0.7, 9.0])  # the last one is clipped to adv_clip=5
    grpo = build(clip_range=clip, adv_clip=5.0)
    sampler = FixedSampler(new, std=0.3)
    out = grpo.loss(DoublePolicy(), sampler, make_batch(old, adv), unit=0)
    torch.testing.assert_close(out.loss, hand_loss(new, old, adv, clip, 5.0), rtol=1e-6, atol=1e-7)
    ratio = torch.exp(new - old)
    assert float(out.metrics["grpo/clipfrac"]) == pytest.approx(float(((ratio - 1).abs() > clip).float().mean()))
    assert float(out.max_metrics["logprob/agreement"]) == pytest.approx(float((new - old).abs().max()))


def test_gradient_is_zero_where_the_ratio_is_clipped_against_the_advantage():
    old = torch.tensor([0.0, 0.0])
    new = torch.tensor([0.5, 0.5])  # ratio e^0.5 > 1 + clip
    grpo = build(clip_range=0.1)
    sampler = FixedSampler(new, std=0.3)
    out = grpo.loss(DoublePolicy(), sampler, make_batch(old, torch.tensor([1.0, 1.0])), unit=0)
    out.loss.sum().backward()
    assert sampler.w.grad == 0  # positive advantage, ratio above 1+c: clipped, no gradient
    sampler.w.grad = None
    out = grpo.loss(DoublePolicy(), sampler, make_batch(old, torch.tensor([-1.0, -1.0])), unit=0)
    out.loss.sum().backward()
    # negative advantage: unclipped branch is larger, d/dw of -A exp(w*new - old) at w=1 is -A*new*e^(new)
    assert float(sampler.w.grad) == pytest.approx(2 * 1.0 * 0.5 * math.exp(0.5), rel=1e-5)


def test_kl_to_reference_matches_gaussian_kl():
    old = torch.zeros(2)
    new = torch.zeros(2)
    std = 0.25
    grpo = build(clip_range=0.2, kl_beta=0.1)
    sampler = FixedSampler(new, std=std)
    batch = make_batch(old, torch.zeros(2))
    out = grpo.loss(DoublePolicy(), sampler, batch, unit=0)
    x = batch.trajectory.latents[:, 0]
    kl = ((x * 1.0 - x * 0.5) ** 2).mean(dim=1) / (2 * std**2)  # KL of two Gaussians sharing std
    torch.testing.assert_close(out.loss, 0.1 * kl)
    torch.testing.assert_close(out.metrics["grpo/kl"], kl.mean())


def test_flow_grpo_kl_normalization_divides_by_std_t_squared_without_dt():
    """Flow-GRPO divides the squared mean difference by std_t^2, the step's std before sqrt(-dt): with the
    step's total std s and |dt| = 0.5 (sigmas 1 -> 0.5), std_t^2 = s^2 / 0.5, a KL 1/|dt| = 2x weaker."""
    std = 0.25
    x_batch = make_batch(torch.zeros(2), torch.zeros(2))
    x = x_batch.trajectory.latents[:, 0]
    diff2 = ((x * 1.0 - x * 0.5) ** 2).mean(dim=1)
    out = {}
    for norm in ("step", "flow-grpo"):
        grpo = build(clip_range=0.2, kl_beta=0.1, kl_normalization=norm)
        out[norm] = grpo.loss(DoublePolicy(), FixedSampler(torch.zeros(2), std=std), x_batch, unit=0)
    torch.testing.assert_close(out["step"].metrics["grpo/kl"], (diff2 / (2 * std**2)).mean())
    std_t2 = std**2 / 0.5
    torch.testing.assert_close(out["flow-grpo"].metrics["grpo/kl"], (diff2 / (2 * std_t2)).mean())
    torch.testing.assert_close(out["flow-grpo"].loss, 0.1 * diff2 / (2 * std_t2))


def test_agreement_only_reported_on_fresh_batches():
    grpo = build()
    sampler = FixedSampler(torch.zeros(2), std=0.3)
    out = grpo.loss(DoublePolicy(), sampler, make_batch(torch.zeros(2), torch.ones(2), fresh=False), unit=0)
    assert "logprob/agreement" not in out.max_metrics


def test_units_are_the_stochastic_steps():
    grpo = build()
    batch = make_batch(torch.zeros(2), torch.ones(2))
    assert grpo.units(batch) == [0]


def test_deterministic_sampler_is_rejected_with_the_fix():
    grpo = build()
    ode = load(strict=True).registry.get("sampler", "ode").create({"steps": 4}, BuildContext())
    with pytest.raises(FlowFactoryError, match="sampler.name.*flow-sde"):
        grpo.setup(object(), ode)


def test_options_are_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        build(clip_range=-1.0)
    with pytest.raises(ValidationError):
        build(clip=0.2)


def test_validate_rejects_grpo_with_a_deterministic_sampler(tmp_path):
    """A config pairing grpo with `ode` fails validation (before any weights load), naming the key and fix."""
    from flowfactory.config import load as load_config
    from flowfactory.errors import ConfigError

    path = tmp_path / "run.yaml"
    path.write_text("policy: {name: flux, options: {preset: tiny}}\nsampler: {name: ode}\n"
                    "rewards: [{name: brightness}]\noptimizer: {name: grpo}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == [("sampler.name", "optimizer 'grpo' needs a stochastic sampler with "
                                   "log-probabilities, but 'ode' is deterministic; use e.g. `flow-sde`")]


# --- GRPO-Guard ---------------------------------------------------------------------------------------------

class ParamPolicy(DoublePolicy):
    """The policy double whose trainable parameter is the sampler double's `w` (GRPO-Guard snapshots it)."""

    def __init__(self, sampler: FixedSampler):
        self.sampler = sampler

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self.sampler.w]


def hand_guard_loss(new, old, adv, x, w_new, w_old, std, dt, clip, adv_clip, reweight=True):
    """GRPO-Guard from its formula, row by row in float64: log r~ = s (l_new - l_old + mean(d^2) / (2 s^2))."""
    out, shifts, logs = [], [], []
    for n, o, a, xr in zip(new.tolist(), old.tolist(), adv.tolist(), x.tolist()):
        a = max(-adv_clip, min(adv_clip, a))
        d2 = sum((w_new * xi - w_old * xi) ** 2 for xi in xr) / len(xr)
        shift = d2 / (2 * std**2)
        log_r = std * (n * w_new - o + shift)
        r = math.exp(log_r)
        weight = 1 / abs(dt) if reweight else 1.0
        out.append(weight * max(-a * r, -a * min(max(r, 1 - clip), 1 + clip)))
        shifts.append(shift)
        logs.append(log_r)
    return torch.tensor(out), sum(shifts) / len(shifts), sum(logs) / len(logs)


@pytest.mark.parametrize("clip", [1e-4, 0.05])
@pytest.mark.parametrize("reweight", [True, False])
def test_guard_fresh_batch_matches_the_formula(clip, reweight):
    """On a fresh batch the sampling mean is the current one: no shift, log r~ = s (l_new - l_old)."""
    old = torch.tensor([-1.0, -1.0, -0.5, -2.0])
    new = torch.tensor([-0.9, -1.3, -0.5, -1.9])
    adv = torch.tensor([1.5, -2.0, 0.7, 9.0])
    std = 0.3
    grpo = build(clip_range=clip, adv_clip=5.0, guard=True, guard_reweight=reweight)
    sampler = FixedSampler(new, std=std)
    batch = make_batch(old, adv)
    out = grpo.loss(ParamPolicy(sampler), sampler, batch, unit=0)
    x = batch.trajectory.latents[:, 0]
    want, shift, log_r = hand_guard_loss(new, old, adv, x, 1.0, 1.0, std, -0.5, clip, 5.0, reweight)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-7)
    assert float(out.metrics["grpo/guard_shift"]) == 0.0
    assert float(out.metrics["grpo/guard_log_ratio"]) == pytest.approx(log_r, rel=1e-5)
    assert float(out.metrics["grpo/guard_weight"]) == (2.0 if reweight else 1.0)
    r = torch.exp(std * (new - old))
    assert float(out.metrics["grpo/clipfrac"]) == pytest.approx(float(((r - 1).abs() > clip).float().mean()))
    assert float(out.metrics["grpo/approx_kl"]) == pytest.approx(float((0.5 * (new - old) ** 2).mean()))
    assert float(out.max_metrics["logprob/agreement"]) == pytest.approx(float((new - old).abs().max()))


@pytest.mark.parametrize("w_new", [1.2, 0.7])
def test_guard_after_an_update_adds_the_mean_shift_back(w_new):
    """After the policy moved, the sampling mean comes from the snapshot taken at the fresh batch: the shift
    mean((mu - mu_old)^2) / (2 s^2) is added back and the parameters are left as they were."""
    old = torch.tensor([-1.0, -0.8, -0.5, -2.0])
    new = torch.tensor([-0.95, -0.9, -0.45, -2.1])
    adv = torch.tensor([1.0, -1.5, 0.3, -0.2])
    std, clip = 0.25, 0.02
    grpo = build(clip_range=clip, guard=True)
    sampler = FixedSampler(new, std=std)
    policy = ParamPolicy(sampler)
    grpo.on_rollout(policy)  # snapshot of the sampling policy: w = 1
    grpo.loss(policy, sampler, make_batch(old, adv, fresh=True), unit=0)
    with torch.no_grad():
        sampler.w.fill_(w_new)  # an optimizer step
    batch = make_batch(old, adv, fresh=False)
    out = grpo.loss(policy, sampler, batch, unit=0)
    assert float(sampler.w.detach()) == pytest.approx(w_new)  # restored after the sampling-policy forward
    x = batch.trajectory.latents[:, 0]
    want, shift, log_r = hand_guard_loss(new, old, adv, x, w_new, 1.0, std, -0.5, clip, 5.0)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    assert shift > 0.1
    assert float(out.metrics["grpo/guard_shift"]) == pytest.approx(shift, rel=1e-5)
    assert float(out.metrics["grpo/guard_log_ratio"]) == pytest.approx(log_r, rel=1e-5)
    assert "logprob/agreement" not in out.max_metrics
    out.loss.sum().backward()  # the parameter swap left autograd's graph intact
    assert sampler.w.grad is not None and torch.isfinite(sampler.w.grad)


def test_guard_snapshot_is_retaken_after_the_next_rollout():
    grpo = build(guard=True)
    sampler = FixedSampler(torch.zeros(2), std=0.3)
    policy = ParamPolicy(sampler)
    adv = torch.ones(2)
    grpo.on_rollout(policy)
    grpo.loss(policy, sampler, make_batch(torch.zeros(2), adv, fresh=True), unit=0)
    with torch.no_grad():
        sampler.w.fill_(2.0)
    grpo.loss(policy, sampler, make_batch(torch.zeros(2), adv, fresh=False), unit=0)
    grpo.on_rollout(policy)  # next epoch: w = 2 sampled
    grpo.loss(policy, sampler, make_batch(torch.zeros(2), adv, fresh=True), unit=0)
    out = grpo.loss(policy, sampler, make_batch(torch.zeros(2), adv, fresh=False), unit=0)
    assert float(out.metrics["grpo/guard_shift"]) == 0.0


def test_guard_needs_the_rollout_snapshot_before_a_non_fresh_batch():
    grpo = build(guard=True)
    sampler = FixedSampler(torch.zeros(2), std=0.3)
    with pytest.raises(FlowFactoryError, match="on_rollout"):
        grpo.loss(ParamPolicy(sampler), sampler, make_batch(torch.zeros(2), torch.ones(2), fresh=False), unit=0)


def test_guard_ratio_is_centred_on_the_flow_sde_step():
    """On a real flow-sde step, log r~ = mean(eps * (mu - mu_old)) exactly, eps = (x' - mu_old) / s: the raw
    log-ratio's negative shift is gone (RatioNorm's derivation, checked against the sampler's own numbers)."""
    from flowfactory.testing import contracts

    registry = contracts.load_registry()
    policy = registry.get("policy", "toy").create({"size": 8, "hidden": 16}, BuildContext(seed=0))
    sampler = registry.get("sampler", "flow-sde").create({"steps": 4}, BuildContext(seed=0))
    prompts = ["a red square", "a blue circle"] * 2
    cond = policy.encode(prompts)
    traj = sampler.rollout(policy, cond, policy.noise(contracts.make_generators(range(4))),
                           contracts.make_generators(range(10, 14)))
    grpo = build(clip_range=0.2, guard=True, guard_reweight=False)
    grpo.setup(policy, sampler)
    batch = TrainBatch(trajectory=traj, cond=cond, advantages=torch.ones(4), fresh=True)
    unit = grpo.units(batch)[1]
    grpo.on_rollout(policy)  # snapshot of the sampling policy
    grpo.loss(policy, sampler, batch, unit)
    with torch.no_grad():
        old = sampler.step_distribution(policy, traj.latents[:, unit], traj.sigmas, unit, cond)
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        new = sampler.step_distribution(policy, traj.latents[:, unit], traj.sigmas, unit, cond)
    eps = (traj.latents[:, unit + 1].float() - old.mean) / old.std
    dims = tuple(range(1, eps.ndim))
    want = (eps * (new.mean - old.mean)).mean(dim=dims)
    out = grpo.loss(policy, sampler, TrainBatch(trajectory=traj, cond=cond, advantages=torch.ones(4), fresh=False),
                    unit)
    torch.testing.assert_close(-out.loss.detach(), torch.exp(want), rtol=2e-4, atol=1e-5)  # A = 1, unclipped side
    shift = ((new.mean - old.mean) ** 2).mean(dim=dims) / (2 * old.std**2)
    assert float(shift.mean()) > 0
    torch.testing.assert_close(out.metrics["grpo/guard_shift"], shift.mean(), rtol=1e-4, atol=1e-7)


class _NoisyEuler:
    """A stochastic sampler double that is not flow-sde (an Euler step plus fixed-std noise)."""

    stochastic = True
    steps = 4


class _NoisyEulerPlugin:
    """An inline plugin registering `_NoisyEuler` as the sampler `noisy-euler`."""

    @hookimpl
    def register_samplers(self, register):
        register("noisy-euler", lambda options, ctx: _NoisyEuler(), summary="Test double: a non flow-sde SDE.")


def _write(tmp_path, sampler: str, guard: bool):
    path = tmp_path / "run.yaml"
    path.write_text(f"policy: {{name: flux, options: {{preset: tiny}}}}\nsampler: {{name: {sampler}}}\n"
                    f"rewards: [{{name: brightness}}]\noptimizer: {{name: grpo, options: {{guard: {str(guard).lower()}}}}}\n")
    return path


def test_validate_rejects_guard_without_flow_sde(tmp_path):
    """`guard: true` with a stochastic sampler other than flow-sde fails validation, naming key and fix."""
    from flowfactory.config import load as load_config
    from flowfactory.errors import ConfigError
    from flowfactory.testing.contracts import load_registry

    registry = load_registry([(_NoisyEulerPlugin(), "test-noisy-euler", "0")])
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "noisy-euler", True), registry=registry)
    assert err.value.problems == [("sampler.name", "optimizer 'grpo' cannot use sampler 'noisy-euler': `guard: true` "
                                   "(GRPO-Guard) normalises the importance ratio of Flow-GRPO's SDE step and needs "
                                   "the `flow-sde` sampler; set `sampler.name: flow-sde` or "
                                   "`optimizer.options.guard: false`")]
    load_config(_write(tmp_path, "noisy-euler", False), registry=registry)  # plain grpo takes any SDE
    load_config(_write(tmp_path, "flow-sde", True), registry=registry)


def test_validate_rejects_guard_with_ode(tmp_path):
    from flowfactory.config import load as load_config
    from flowfactory.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "ode", True))
    assert err.value.problems == [("sampler.name", "optimizer 'grpo' needs a stochastic sampler with "
                                   "log-probabilities, but 'ode' is deterministic; use e.g. `flow-sde`")]


def test_setup_rejects_guard_without_flow_sde():
    grpo = build(guard=True)
    with pytest.raises(FlowFactoryError, match="guard.*flow-sde"):
        grpo.setup(object(), _NoisyEuler())
    build(guard=False).setup(object(), _NoisyEuler())
