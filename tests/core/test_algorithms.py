"""The algorithm toolkit (`flowfactory.algorithms`) against computations written here row by row in Python floats,
the parameter snapshot and EMA against hand-made copies, and `OptimizerHooks` as the one base class and the one
sampler check."""

from __future__ import annotations

import math

import pytest
import torch

from flowfactory.algorithms import (
    ParamSnapshot,
    approx_kl,
    clip_advantages,
    clipped_surrogate,
    shift_times,
    stratified_times,
)
from flowfactory.errors import ConfigError, FlowFactoryError
from flowfactory.registry import BuildContext
from flowfactory.train.ema import EMA
from flowfactory.types import OptimizerHooks, Requirements


def hand_surrogate(log_ratio: list[float], adv: list[float], c: float) -> tuple[list[float], float, float, float]:
    """Per-row max(-A r, -A clip(r, 1 - c, 1 + c)), and mean r, share of |r - 1| > c, mean 0.5 (log r)^2."""
    ratios = [math.exp(lr) for lr in log_ratio]
    loss = [max(-a * r, -a * min(max(r, 1 - c), 1 + c)) for r, a in zip(ratios, adv)]
    n = len(ratios)
    return (loss, sum(ratios) / n, sum(abs(r - 1) > c for r in ratios) / n, sum(0.5 * lr * lr for lr in log_ratio) / n)


LOG_RATIO = [0.0, 0.15, -0.3, 0.02, -0.01, 0.4]
ADV = [1.0, 2.0, -1.5, -0.5, 3.0, -2.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [0.05, 0.2, 1.0])
def test_clipped_surrogate_matches_the_formula(dtype: torch.dtype, c: float) -> None:
    log_ratio = torch.tensor(LOG_RATIO, dtype=dtype, requires_grad=True)
    loss, m = clipped_surrogate(log_ratio, torch.tensor(ADV, dtype=dtype), c)
    want, ratio, clipfrac, kl = hand_surrogate(LOG_RATIO, ADV, c)
    assert loss.dtype == dtype and tuple(loss.shape) == (6,) and loss.requires_grad
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert loss.tolist() == pytest.approx(want, rel=tol, abs=tol)
    assert float(m["ratio"]) == pytest.approx(ratio, rel=tol)
    assert float(m["clipfrac"]) == pytest.approx(clipfrac)
    assert float(m["approx_kl"]) == pytest.approx(kl, rel=tol)
    assert all(v.dtype == dtype and v.ndim == 0 and not v.requires_grad for v in m.values())


def test_clipped_surrogate_gradient_is_zero_on_the_clipped_side() -> None:
    """The clipped side carries no gradient: a positive advantage above 1 + c and a negative one below 1 - c."""
    log_ratio = torch.tensor([math.log(1.5), math.log(0.5), math.log(1.05), math.log(0.5)], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 1.0, 1.0])
    loss, m = clipped_surrogate(log_ratio, adv, 0.2)
    loss.sum().backward()
    # d(-A r)/d log r = -A r on the unclipped side
    assert log_ratio.grad.tolist() == pytest.approx([0.0, 0.0, -1.05, -0.5], rel=1e-6)
    assert float(m["clipfrac"]) == pytest.approx(0.75)


def test_approx_kl_can_come_from_another_log_ratio() -> None:
    """GRPO-Guard clips a normalised ratio but reports the raw log-ratio's approx_kl."""
    raw = torch.tensor([0.2, -0.4])
    _, m = clipped_surrogate(raw * 0.01, torch.ones(2), 0.1, kl_log_ratio=raw)
    assert float(m["approx_kl"]) == pytest.approx((0.5 * 0.04 + 0.5 * 0.16) / 2)
    assert float(m["ratio"]) == pytest.approx((math.exp(0.002) + math.exp(-0.004)) / 2)
    assert float(approx_kl(raw.requires_grad_())) == pytest.approx(0.05) and not approx_kl(raw).requires_grad


def test_clip_advantages() -> None:
    adv = torch.tensor([-9.0, -5.0, 0.3, 4.99, 7.0], dtype=torch.float64)
    assert clip_advantages(adv, 5.0).tolist() == [-5.0, -5.0, 0.3, 4.99, 5.0]
    assert clip_advantages(adv, 5.0).dtype == torch.float64
    assert clip_advantages(adv, None) is adv


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_shift_times(shift: float) -> None:
    t = [0.0, 0.1, 0.5, 0.9, 1.0]
    got = shift_times(torch.tensor(t, dtype=torch.float64), shift).tolist()
    assert got == pytest.approx([shift * x / (1 + (shift - 1) * x) for x in t], rel=1e-15)
    assert got[0] == 0.0 and got[-1] == pytest.approx(1.0)


@pytest.mark.parametrize(("lo", "hi", "shift"), [(0.0, 1.0, 1.0), (0.2, 0.9, 3.0)])
def test_stratified_times_put_one_time_in_each_stratum(lo: float, hi: float, shift: float) -> None:
    k = 7
    t = stratified_times(k, torch.Generator().manual_seed(3), lo, hi, shift)
    assert t.dtype == torch.float32 and tuple(t.shape) == (k,)
    assert torch.equal(t, stratified_times(k, torch.Generator().manual_seed(3), lo, hi, shift))
    # undo the shift (t = s u / (1 + (s - 1) u)  <=>  u = t / (s - (s - 1) t)) and find each time's stratum
    u = [x / (shift - (shift - 1) * x) for x in t.double().tolist()]
    strata = [int((x - lo) / (hi - lo) * k) for x in u]
    assert sorted(strata) == list(range(k)) and strata != list(range(k))  # one per stratum, not in order
    assert all(lo <= x < hi for x in u)


# --- ParamSnapshot and EMA ------------------------------------------------------------------------------------

def params(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.nn.Parameter(torch.randn(3, 4, generator=g).to(dtype)),
            "b.bias": torch.nn.Parameter(torch.randn(5, generator=g).to(dtype))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("snapshot_dtype", [None, torch.float32])
def test_snapshot_swaps_in_and_restores(dtype: torch.dtype, snapshot_dtype: torch.dtype | None) -> None:
    p = params(dtype=dtype)
    taken = {n: v.detach().clone() for n, v in p.items()}
    snap = ParamSnapshot(p, dtype=snapshot_dtype)
    with torch.no_grad():
        for v in p.values():
            v.add_(1.0)
    moved = {n: v.detach().clone() for n, v in p.items()}
    with snap.swapped(p):
        assert all(torch.equal(p[n], taken[n]) for n in p)  # exactly the values taken, also through float32
        assert all(v.requires_grad and v.dtype == dtype for v in p.values())
    assert all(torch.equal(p[n], moved[n]) for n in p)
    with pytest.raises(RuntimeError, match="inside"), snap.swapped(p):
        raise RuntimeError("inside")
    assert all(torch.equal(p[n], moved[n]) for n in p)  # restored on an error too


def test_snapshot_of_a_list_is_keyed_by_position_and_retaken_in_place() -> None:
    p = list(params().values())
    snap = ParamSnapshot(p)
    assert list(snap.shadow) == ["0", "1"]
    with torch.no_grad():
        p[0].mul_(2.0)
    again = ParamSnapshot.retake(snap, p)
    assert again is snap and torch.equal(snap.shadow["0"], p[0].detach())
    assert snap.shadow["0"] is not p[0]  # a copy, not the parameter
    assert isinstance(ParamSnapshot.retake(None, p), ParamSnapshot)
    with pytest.raises(ValueError, match="ParamSnapshot: the parameters changed"):
        snap.swapped(p[:1]).__enter__()
    with pytest.raises(TypeError, match="dict"):
        ParamSnapshot(p[0])


def test_snapshot_state_round_trip_by_name() -> None:
    a, b = ParamSnapshot(params(0)), ParamSnapshot(params(1))
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(b.shadow[n], a.shadow[n]) for n in a.shadow)
    with pytest.raises(ValueError, match="saved names differ"):
        b.load_state_dict({"shadow": {"other": torch.zeros(1)}})


def test_ema_is_a_moving_snapshot() -> None:
    p = params()
    start = {n: v.detach().clone() for n, v in p.items()}
    ema = EMA(p, 0.75)
    assert isinstance(ema, ParamSnapshot) and all(s.dtype == torch.float32 for s in ema.shadow.values())
    with torch.no_grad():
        for v in p.values():
            v.add_(2.0)
    ema.update(p)
    want = {n: 0.75 * start[n] + 0.25 * p[n].detach() for n in p}
    assert all(torch.allclose(ema.shadow[n], want[n], atol=1e-6) for n in p)
    with ema.swapped(p):
        assert all(torch.allclose(p[n], want[n], atol=1e-6) for n in p)
    state = ema.state_dict()
    assert set(state) == {"decay", "shadow"} and state["decay"] == 0.75
    other = EMA(params(5), 0.1)
    other.load_state_dict(state)
    assert other.decay == 0.75 and all(torch.equal(other.shadow[n], ema.shadow[n]) for n in p)
    with pytest.raises(TypeError, match="named parameters"):
        EMA(list(p.values()), 0.5)


# --- OptimizerHooks: the base class and the sampler check ----------------------------------------------------

class NeedsSteps(OptimizerHooks):
    requirements = Requirements(keep="steps", stochastic=True)

    def check_sampler(self, sampler):
        return None if getattr(sampler, "sde_type", None) == "cps" else "wants `cps`"


def samplers():
    from flowfactory.plugins import load

    registry = load(entry_points=False, strict=True).registry
    return {name: registry.get("sampler", name).create({"steps": 4}, BuildContext()) for name in
            ("ode", "flow-sde", "dance-sde", "cps")}


def test_built_in_samplers_declare_their_sde_type() -> None:
    assert {name: s.sde_type for name, s in samplers().items()} == {
        "ode": None, "flow-sde": "flow-sde", "dance-sde": "dance-sde", "cps": "cps"}


def test_sampler_problem_reads_capabilities() -> None:
    s = samplers()
    algo = NeedsSteps()
    assert algo.sampler_problem(s["ode"], "'ode'") == (
        "needs a stochastic sampler with log-probabilities, but 'ode' is deterministic; use e.g. `flow-sde`")
    assert algo.sampler_problem(s["flow-sde"], "'flow-sde'") == "cannot use sampler 'flow-sde': wants `cps`"
    assert algo.sampler_problem(s["cps"], "'cps'") is None
    with pytest.raises(FlowFactoryError, match=r"^sampler.name: NeedsSteps cannot use sampler DanceSDESampler: wants"):
        algo.setup(None, s["dance-sde"])
    assert algo.setup(None, s["cps"]) is None

    class AnySampler(OptimizerHooks):
        requirements = Requirements(keep="final", stochastic=False)

    assert AnySampler().sampler_problem(s["ode"], "'ode'") is None
    assert AnySampler().setup(None, None) is None  # no sampler attribute is read


def test_validation_refuses_an_algorithm_without_the_base_class(make_state, components_plugin, config_file) -> None:
    from flowfactory import hookimpl
    from flowfactory.config import load

    class Bare:
        requirements = Requirements(keep="final", stochastic=False)

    class Plugin:
        @hookimpl
        def register_optimizers(self, register):
            register("bare", lambda options, ctx: Bare())

    state = make_state(components_plugin, Plugin())
    with pytest.raises(ConfigError) as err:
        load(config_file(optimizer={"name": "bare"}), registry=state.registry)
    assert err.value.problems == [("optimizer.name", "optimizer 'bare': its build returned Bare, which does not "
                                   "subclass flowfactory.types.OptimizerHooks; every algorithm must (update its package)")]
