"""Contract suites: pytest base classes that check a component against its protocol in `flowfactory.types`.

A plugin's test file subclasses a suite and names its component:

    from flowfactory.testing import PolicyContract

    class TestFluxContract(PolicyContract):
        component = "flux"                                  # the registered name
        options = {"preset": "tiny", "lora": {"rank": 4}}   # validated by the component's options model

Each suite builds the component the way `ff run` does: through the registry of every installed plugin
plus the `toy` test policy, with `BuildContext(seed=...)`. Installed plugins load leniently, so an unrelated
broken package does not fail your tests (when the component under test is missing, the error names the
packages that failed); the suite's own inline plugins (`extra_plugins`) load strictly.

A suite's `test_*` methods are the contract: `test_no_overrides` fails, naming the method, when a subclass
redefines or deletes one without `@flowfactory.testing.override_contract("reason")`.
The sampler and optimizer suites run on the toy policy, so they need no diffusers. The base classes are
not named `Test*`, so pytest collects only their subclasses. Expensive knobs (prompts, steps, sizes) are
class attributes; the fixtures (`registry`, `policy`, `sampler`, ...) are class-scoped and may be overridden.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from flowfactory.errors import FlowFactoryError, PluginError
from flowfactory.registry import BuildContext, Registry
from flowfactory.testing import OVERRIDE_MARK
from flowfactory.types import (
    Conditioning,
    LossOutput,
    OptimizerHooks,
    Policy,
    PolicyOptimizer,
    Requirements,
    Reward,
    Sampler,
    Samples,
    TrainBatch,
    Trajectory,
    select_rows,
)

TESTING_PACKAGE = "flowfactory-testing"
PluginEntry = tuple[Any, str, str]  # (plugin object, package name, version), as `plugins.load` takes them


# --- helpers, public so plugin tests can use them too ------------------------------------------------------

def load_registry(extra_plugins: Sequence[PluginEntry] = (), *, entry_points: bool = True,
                  strict: bool = False) -> Registry:
    """The registry `ff run` would see (installed entry points), plus the `toy` policy and `extra_plugins`
    (inline plugins of a test that are not installed as entry points).

    Installed plugins load leniently whatever FLOWFACTORY_STRICT_PLUGINS says (strict=True: any problem is
    a PluginError), so another package's broken plugin does not fail a plugin author's tests; the registry's
    `failed_packages` names them in the "no such component" error. A problem of `extra_plugins` or the toy
    plugin is always a PluginError. entry_points=False leaves installed plugin packages out: core's own
    tests use it so that they do not depend on which plugins are installed."""
    from flowfactory import plugins
    from flowfactory.testing import plugin as toy_plugin

    own = [(toy_plugin, TESTING_PACKAGE, "0"), *extra_plugins]
    state = plugins.load(entry_points=entry_points, extra_plugins=own, strict=strict)
    own_problems = [p for p in state.problems if p.entry_point is None and p.package != "flowfactory"]
    if own_problems:
        raise PluginError("; ".join(f"inline plugin {p.name!r} ({p.package}): {p.problem}" for p in own_problems))
    return state.registry


def _is_suite(cls: type) -> bool:
    """A contract suite shipped by flowfactory (contracts, diffusers), as opposed to a plugin's test class."""
    return cls.__module__.startswith("flowfactory.testing.")


def contract_overrides(cls: type) -> list[str]:
    """One line per contract test (a `test_*` method of a flowfactory suite `cls` inherits) that `cls` or a
    class between redefines or deletes without `@flowfactory.testing.override_contract("reason")`."""
    suites = [k for k in cls.__mro__ if _is_suite(k)]
    problems = []
    for name in sorted({n for k in suites for n in vars(k) if n.startswith("test_")}):
        owner = next(k for k in cls.__mro__ if name in vars(k))
        value = vars(owner)[name]
        if _is_suite(owner) or getattr(value, OVERRIDE_MARK, None):
            continue
        suite = next(k for k in suites if name in vars(k))
        what = "overrides" if callable(value) else f"deletes (sets it to {value!r})"
        problems.append(
            f"{owner.__qualname__}.{name} {what} the contract test {suite.__name__}.{name}. A component that "
            "cannot meet it should say why: decorate the override with "
            "@flowfactory.testing.override_contract(\"reason\") (call pytest.skip(reason) in it to leave the "
            "check out), or remove it.")
    return problems


def make_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One seeded generator per sample, as the loop hands them to `noise` and `rollout`."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest elementwise difference, in float64 on the CPU (shapes must match)."""
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.numel() == 0:
        return 0.0
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max())


def _zero_grads(params: Sequence[torch.Tensor]) -> None:
    for p in params:
        p.grad = None


@contextmanager
def _perturbed(params: Sequence[nn.Parameter], size: float = 1e-2, seed: int = 0) -> Iterator[None]:
    """Move every parameter by +-size (a stand-in for a training step), restoring them on exit."""
    saved = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            for p in params:
                signs = torch.randint(0, 2, p.shape, generator=gen).to(device=p.device, dtype=p.dtype) * 2 - 1
                p.add_(signs, alpha=size)
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def _reachable_modules(policy: Any) -> list[nn.Module]:
    """torch modules among a policy's attributes: direct, in a dict/list/tuple, or a diffusers pipeline's
    `components` (where text encoders and VAEs usually live)."""
    found: list[nn.Module] = []

    def visit(value: Any, depth: int) -> None:
        if isinstance(value, nn.Module):
            found.append(value)
        elif isinstance(value, Mapping) and depth < 2:
            for v in value.values():
                visit(v, depth + 1)
        elif isinstance(value, (list, tuple)) and depth < 2:
            for v in value:
                visit(v, depth + 1)
        elif depth == 0 and isinstance(getattr(value, "components", None), Mapping):
            visit(value.components, depth + 1)

    for value in vars(policy).values():
        visit(value, 0)
    return found


class _ComponentContract:
    """What every suite shares: the component under test, its options, and how it is built."""

    kind: ClassVar[str]
    component: ClassVar[str | None] = None  # registered name; a subclass must set it
    options: ClassVar[Mapping[str, Any]] = {}  # the component's options, as in a run config
    seed: ClassVar[int] = 0  # BuildContext.seed
    extra_plugins: ClassVar[Sequence[PluginEntry]] = ()  # inline plugins that are not entry points
    atol: ClassVar[float] = 1e-5  # tolerance of "equal" (and the least difference counted as "different")

    @classmethod
    def context(cls, seed: int | None = None) -> BuildContext:
        """The build context; override to set a device, dtype or output_dir."""
        return BuildContext(seed=cls.seed if seed is None else seed)

    @classmethod
    def build(cls, registry: Registry, seed: int | None = None) -> Any:
        """Build the component under test through the registry, as `ff run` does."""
        if not cls.component:
            raise TypeError(f"{cls.__name__} must set `component` to the registered {cls.kind} name")
        spec = registry.get(cls.kind, cls.component)
        return spec.create(copy.deepcopy(dict(cls.options)), cls.context(seed))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not _is_suite(cls) and "test_no_overrides" in vars(cls):
            raise TypeError(f"{cls.__qualname__} redefines test_no_overrides, the guard of the contract suite; "
                            "remove it (mark an overridden contract test with "
                            "@flowfactory.testing.override_contract(\"reason\") instead)")

    @pytest.fixture(scope="class")
    @classmethod
    def registry(cls) -> Registry:
        return load_registry(cls.extra_plugins)

    def test_no_overrides(self) -> None:
        """The suite's tests are the contract: none is silently redefined or deleted by this class."""
        problems = contract_overrides(type(self))
        assert not problems, "\n".join(problems)


def _toy_policy(registry: Registry, options: Mapping[str, Any], seed: int) -> Policy:
    return registry.get("policy", "toy").create(copy.deepcopy(dict(options)), BuildContext(seed=seed))


# --- policy -------------------------------------------------------------------------------------------------

class PolicyContract(_ComponentContract):
    """Checks a model plugin against the `Policy` protocol: shapes, determinism, gradients, reference view."""

    kind = "policy"
    prompts: ClassVar[tuple[str, ...]] = ("a red square", "a blue circle")  # batch size = len(prompts)
    steps: ClassVar[int] = 4  # schedule length used for `sigmas` and the sigma velocity is checked at

    @pytest.fixture(scope="class")
    @classmethod
    def policy(cls, registry: Registry) -> Policy:
        if len(set(cls.prompts)) < 2:
            raise TypeError(f"{cls.__name__}.prompts needs at least two different prompts")
        return cls.build(registry)

    @pytest.fixture(scope="class")
    @classmethod
    def cond(cls, policy: Policy) -> Conditioning:
        return policy.encode(list(cls.prompts))

    @pytest.fixture(scope="class")
    @classmethod
    def x(cls, policy: Policy) -> torch.Tensor:
        return policy.noise(make_generators(range(len(cls.prompts))))

    @classmethod
    def sigma(cls, policy: Policy, x: torch.Tensor) -> torch.Tensor:
        """[B] noise level inside the schedule (its second sigma), where the velocity is checked."""
        return torch.full((x.shape[0],), float(policy.sigmas(cls.steps)[1]), device=x.device)

    def test_implements_protocol(self, policy: Policy) -> None:
        assert isinstance(policy, Policy), f"{type(policy).__name__} lacks members of flowfactory.types.Policy"
        shape = policy.latent_shape
        assert isinstance(shape, tuple) and shape and all(isinstance(d, int) and d > 0 for d in shape), (
            f"latent_shape must be a tuple of positive ints, got {shape!r}")
        blocks = policy.fsdp_block_classes
        assert isinstance(blocks, tuple) and all(isinstance(b, type) for b in blocks), (
            f"fsdp_block_classes must be a tuple of classes, got {blocks!r}")
        assert isinstance(policy.module, nn.Module), "policy.module must be the trainable torch.nn.Module"

    def test_trainable_parameters_belong_to_module(self, policy: Policy) -> None:
        params = policy.trainable_parameters()
        assert len(params) > 0, "trainable_parameters() is empty: nothing to train"
        assert all(p.requires_grad for p in params), "every trainable parameter must have requires_grad=True"
        in_module = {id(p) for p in policy.module.parameters()}
        outside = sum(id(p) not in in_module for p in params)
        assert outside == 0, (f"{outside} trainable parameters are not in policy.module; Accelerate/DDP wraps "
                              "only the module, so their gradients would not be synchronised")

    def test_encode_is_batch_first_frozen_and_per_prompt(self, policy: Policy, cond: Conditioning) -> None:
        n = len(self.prompts)
        assert isinstance(cond, dict) and cond, "encode must return a non-empty dict of tensors"
        for k, v in cond.items():
            assert isinstance(v, torch.Tensor), f"encode()[{k!r}] is {type(v).__name__}, not a tensor"
            assert v.ndim >= 1 and v.shape[0] == n, f"encode()[{k!r}] has shape {tuple(v.shape)}, batch {n} first"
            assert not v.requires_grad, f"encode()[{k!r}] requires grad; conditioning is frozen"
        # The loop caches rows per prompt and concatenates rows from different calls.
        for i, p in enumerate(self.prompts):
            alone = policy.encode([p])
            assert alone.keys() == cond.keys(), "encode returns different keys for different batches"
            for k in cond:
                assert alone[k].shape == cond[k][i:i + 1].shape, (
                    f"encode([p])[{k!r}] has shape {tuple(alone[k].shape)} but its row in a batch has "
                    f"{tuple(cond[k][i:i + 1].shape)}; pad to a fixed length, not to the batch's longest")
                assert max_abs_diff(alone[k], cond[k][i:i + 1]) <= self.atol, (
                    f"encode()[{k!r}] of prompt {p!r} depends on the other prompts of the batch")

    def test_noise_shape_and_generators(self, policy: Policy) -> None:
        n = len(self.prompts)
        a = policy.noise(make_generators(range(n)))
        assert tuple(a.shape) == (n, *policy.latent_shape), (
            f"noise shape {tuple(a.shape)}, expected {(n, *policy.latent_shape)}")
        assert torch.isfinite(a).all()
        assert torch.equal(a, policy.noise(make_generators(range(n)))), "same seeds must give equal noise"
        b = policy.noise(make_generators(range(100, 100 + n)))
        for i in range(n):
            assert max_abs_diff(a[i], b[i]) > self.atol, "different seeds must give different noise"
        # Row i depends only on generator i, so a sample draws the same noise in any batch or process.
        alone = policy.noise(make_generators([n - 1]))
        assert torch.equal(alone[0], a[n - 1]), "noise row depends on the other generators of the batch"

    def test_sigmas_schedule(self, policy: Policy) -> None:
        for steps in sorted({1, 2, self.steps}):
            s = policy.sigmas(steps)
            assert isinstance(s, torch.Tensor) and tuple(s.shape) == (steps + 1,), (
                f"sigmas({steps}) must have shape [{steps + 1}], got {tuple(getattr(s, 'shape', ()))}")
            s = s.double().cpu()
            assert 0 < float(s[0]) <= 1.0, f"sigmas({steps})[0] = {float(s[0])} is not in (0, 1]"
            assert float(s[-1]) == 0.0, f"sigmas({steps}) must end at 0, ends at {float(s[-1])}"
            assert bool((s[1:] < s[:-1]).all()), f"sigmas({steps}) is not strictly descending: {s.tolist()}"

    def test_velocity_shape_and_determinism(self, policy: Policy, x: torch.Tensor, cond: Conditioning) -> None:
        sigma = self.sigma(policy, x)
        with torch.no_grad():
            v = policy.velocity(x, sigma, cond)
            again = policy.velocity(x, sigma, cond)
            scalar = policy.velocity(x, sigma[0], cond)
        assert v.shape == x.shape, f"velocity shape {tuple(v.shape)} != x shape {tuple(x.shape)}"
        assert torch.isfinite(v).all(), "velocity has NaN or inf"
        assert max_abs_diff(v, again) <= self.atol, "velocity is not deterministic"
        assert max_abs_diff(v, scalar) <= self.atol, "a scalar sigma must act like the same sigma for every row"

    def test_velocity_rows_are_independent(self, policy: Policy, x: torch.Tensor, cond: Conditioning) -> None:
        sigma = self.sigma(policy, x)
        with torch.no_grad():
            v = policy.velocity(x, sigma, cond)
            for i in range(x.shape[0]):
                alone = policy.velocity(x[i:i + 1], sigma[i:i + 1], select_rows(cond, slice(i, i + 1)))
                assert max_abs_diff(alone, v[i:i + 1]) <= self.atol, (
                    f"velocity of row {i} changes with the other rows of the batch")

    def test_prompt_changes_velocity(self, policy: Policy, x: torch.Tensor, cond: Conditioning) -> None:
        same_x = x[:1].expand(2, *x.shape[1:]).contiguous()
        two = select_rows(cond, slice(0, 2))
        with torch.no_grad():
            v = policy.velocity(same_x, self.sigma(policy, same_x), two)
        assert max_abs_diff(v[0], v[1]) > self.atol, (
            f"prompts {self.prompts[0]!r} and {self.prompts[1]!r} give the same velocity: conditioning is ignored")

    def test_gradient_reaches_trainable_and_only_trainable(self, policy: Policy, x: torch.Tensor,
                                                           cond: Conditioning) -> None:
        params = policy.trainable_parameters()
        trainable = {id(p) for p in params}
        frozen = [p for m in _reachable_modules(policy) for p in m.parameters() if id(p) not in trainable]
        target = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(x.device)

        def backward() -> set[int]:
            _zero_grads(params)
            v = policy.velocity(x, self.sigma(policy, x), cond)
            ((v.float() - target) ** 2).mean().backward()
            missing = [i for i, p in enumerate(params) if p.grad is None]
            assert not missing, f"{len(missing)} trainable parameters got no gradient from the velocity"
            assert all(torch.isfinite(p.grad).all() for p in params), "a gradient has NaN or inf"
            leaked = sum(p.grad is not None for p in frozen)
            assert leaked == 0, f"{leaked} frozen parameters received a gradient"
            return {i for i, p in enumerate(params) if bool((p.grad != 0).any())}

        try:
            nonzero = backward()
            if len(nonzero) < len(params):
                # A zero-initialised LoRA B makes A's gradient exactly zero at init; after one update it is not.
                with _perturbed(params):
                    nonzero |= backward()
            assert len(nonzero) == len(params), (
                f"{len(params) - len(nonzero)} of {len(params)} trainable parameters get an all-zero gradient")
        finally:
            _zero_grads(params)
            _zero_grads(frozen)

    def test_reference_is_the_initial_policy(self, policy: Policy, x: torch.Tensor, cond: Conditioning) -> None:
        sigma = self.sigma(policy, x)
        with torch.no_grad():
            initial = policy.velocity(x, sigma, cond)
        with policy.reference():
            assert not torch.is_grad_enabled(), "reference() must run under no grad"
            ref = policy.velocity(x, sigma, cond)
        assert not ref.requires_grad, "reference velocity requires grad"
        assert max_abs_diff(ref, initial) <= self.atol, "before training, reference() must equal the policy"
        with _perturbed(policy.trainable_parameters()):
            with torch.no_grad():
                moved = policy.velocity(x, sigma, cond)
            assert max_abs_diff(moved, initial) > self.atol, "changing the trainable parameters changes nothing"
            with policy.reference():
                ref_after = policy.velocity(x, sigma, cond)
            assert max_abs_diff(ref_after, initial) <= self.atol, "reference() follows the trained parameters"
            with torch.no_grad():
                back = policy.velocity(x, sigma, cond)
            assert max_abs_diff(back, moved) <= self.atol, "leaving reference() does not restore the policy"

    def test_decode_images_in_unit_range(self, policy: Policy, x: torch.Tensor) -> None:
        img = policy.decode(x)
        assert isinstance(img, torch.Tensor) and img.dtype == torch.float32, "decode must return float32"
        assert img.ndim in (4, 5) and img.shape[0] == x.shape[0], (
            f"decode must return [B, C, H, W] or [B, T, C, H, W] with B={x.shape[0]}, got {tuple(img.shape)}")
        assert img.shape[-3] in (1, 3), f"decode returned {img.shape[-3]} channels; rewards expect 1 or 3"
        assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0, (
            f"decoded values span [{float(img.min())}, {float(img.max())}], not [0, 1]")
        assert max_abs_diff(img, policy.decode(x)) <= self.atol, "decode is not deterministic"

    def test_decode_is_differentiable(self, policy: Policy, x: torch.Tensor) -> None:
        """Reward back-propagation (`draft`) differentiates the decode: a finite, nonzero gradient reaches the
        latents, and the images equal those decoded without grad."""
        latents = x.detach().clone().requires_grad_(True)
        img = policy.decode(latents)
        assert img.requires_grad, "decode detaches its input (drop @torch.no_grad: the rollout already runs under it)"
        assert max_abs_diff(img.detach(), policy.decode(x)) <= self.atol, "decode with grad gives other images"
        (grad,) = torch.autograd.grad(img.float().mean(), latents)
        assert bool(torch.isfinite(grad).all()) and bool((grad != 0).any()), "decode's gradient is zero or not finite"

    def test_same_seed_builds_the_same_policy(self, registry: Registry, policy: Policy, x: torch.Tensor,
                                              cond: Conditioning) -> None:
        twin = self.build(registry)
        sigma = self.sigma(policy, x)
        with torch.no_grad():
            a = policy.velocity(x, sigma, cond)
            b = twin.velocity(x, sigma, twin.encode(list(self.prompts)))
        assert max_abs_diff(a, b) <= self.atol, f"two builds with seed {self.seed} give different velocities"

    def test_save_writes_files(self, policy: Policy, tmp_path: Path) -> None:
        out = tmp_path / "saved"
        policy.save(str(out))
        files = [f for f in out.rglob("*") if f.is_file()]
        assert files, f"save({str(out)!r}) wrote no files"
        assert any(f.stat().st_size > 0 for f in files), "save wrote only empty files"


# --- sampler ------------------------------------------------------------------------------------------------

class SamplerContract(_ComponentContract):
    """Checks a sampler against the `Sampler` protocol on the toy policy: rollout shapes, generator
    determinism, deterministic mode, batch independence, and that `log_prob` agrees with the rollout."""

    kind = "sampler"
    stochastic: ClassVar[bool] = True  # False: an ODE sampler with no stochastic steps; log_prob raises ValueError
    policy_options: ClassVar[Mapping[str, Any]] = {"size": 8, "hidden": 16}  # the toy policy's options
    prompts: ClassVar[tuple[str, ...]] = ("a red square", "a blue circle", "a green triangle")
    epochs: ClassVar[tuple[int, ...]] = (0, 1, 2)  # epochs rolled out (an SDE window may move per epoch)
    agreement_atol: ClassVar[float] = 1e-5  # |log_prob recomputed - log_prob at rollout|, float32

    @pytest.fixture(scope="class")
    @classmethod
    def sampler(cls, registry: Registry) -> Sampler:
        return cls.build(registry)

    @pytest.fixture(scope="class")
    @classmethod
    def policy(cls, registry: Registry) -> Policy:
        return _toy_policy(registry, cls.policy_options, cls.seed)

    @pytest.fixture(scope="class")
    @classmethod
    def cond(cls, policy: Policy) -> Conditioning:
        return policy.encode(list(cls.prompts))

    @classmethod
    def rollout(cls, sampler: Sampler, policy: Policy, cond: Conditioning, *, rows: Sequence[int] | None = None,
                step_salt: int = 0, **kwargs: Any) -> Trajectory:
        """Roll out `rows` (default all): noise from seeds 1000+row, step noise from seeds 2000+row+salt."""
        rows = list(range(len(cls.prompts))) if rows is None else list(rows)
        noise = policy.noise(make_generators([1000 + r for r in rows]))
        gens = make_generators([2000 + r + step_salt for r in rows])
        return sampler.rollout(policy, select_rows(cond, rows), noise, gens, **kwargs)

    def test_implements_protocol(self, sampler: Sampler) -> None:
        assert isinstance(sampler, Sampler), f"{type(sampler).__name__} lacks members of flowfactory.types.Sampler"
        assert isinstance(sampler.steps, int) and sampler.steps >= 1, f"steps must be an int >= 1: {sampler.steps!r}"
        assert sampler.stochastic is self.stochastic, (
            f"sampler.stochastic is {sampler.stochastic!r} but the contract expects {self.stochastic!r}; set "
            f"`stochastic = {sampler.stochastic!r}` on {type(self).__name__} if that is intended")
        sde_type = getattr(type(sampler), "sde_type", None)
        assert sde_type is None or (isinstance(sde_type, str) and sde_type), (
            f"{type(sampler).__name__}.sde_type (optional) must be a non-empty str class attribute or None")

    def test_rollout_keeping_steps(self, sampler: Sampler, policy: Policy, cond: Conditioning) -> None:
        n, s = len(self.prompts), sampler.steps
        any_stochastic = False
        for epoch in self.epochs:
            t = self.rollout(sampler, policy, cond, epoch=epoch)
            assert tuple(t.sigmas.shape) == (s + 1,), f"sigmas shape {tuple(t.sigmas.shape)}, expected [{s + 1}]"
            assert max_abs_diff(t.sigmas, policy.sigmas(s).float()) <= 1e-6, "sigmas are not the policy's schedule"
            assert t.stochastic.dtype == torch.bool and tuple(t.stochastic.shape) == (s,)
            assert t.latents is not None and tuple(t.latents.shape) == (n, s + 1, *policy.latent_shape), (
                f"latents shape {None if t.latents is None else tuple(t.latents.shape)}, "
                f"expected {(n, s + 1, *policy.latent_shape)}")
            assert torch.equal(t.latents[:, 0], policy.noise(make_generators([1000 + r for r in range(n)]))), (
                "latents[:, 0] must be the initial noise")
            assert torch.equal(t.latents[:, -1], t.final), "latents[:, -1] must be the final state"
            assert torch.isfinite(t.latents).all(), "latents have NaN or inf"
            assert t.log_probs is not None and t.log_probs.dtype == torch.float32
            assert tuple(t.log_probs.shape) == (n, s), f"log_probs shape {tuple(t.log_probs.shape)}, expected {(n, s)}"
            mask = t.stochastic.to(t.log_probs.device)
            assert torch.isfinite(t.log_probs[:, mask]).all(), "log_probs at stochastic steps are not finite"
            assert bool((t.log_probs[:, ~mask] == 0).all()), "log_probs must be 0 at deterministic steps"
            any_stochastic |= bool(t.stochastic.any())
        if self.stochastic:
            assert any_stochastic, f"no stochastic step in epochs {self.epochs}"
        else:
            assert not any_stochastic, "a deterministic sampler marked steps stochastic"

    def test_rollout_keeping_final(self, sampler: Sampler, policy: Policy, cond: Conditioning) -> None:
        full = self.rollout(sampler, policy, cond)
        final = self.rollout(sampler, policy, cond, keep="final")
        assert final.latents is None, "keep='final' must not keep per-step latents"
        assert tuple(final.final.shape) == (len(self.prompts), *policy.latent_shape)
        assert max_abs_diff(final.final, full.final) <= self.atol, "keep='final' changes the samples"

    def test_rollout_is_determined_by_generators(self, sampler: Sampler, policy: Policy,
                                                 cond: Conditioning) -> None:
        a = self.rollout(sampler, policy, cond)
        b = self.rollout(sampler, policy, cond)
        assert torch.equal(a.final, b.final) and torch.equal(a.latents, b.latents), "same seeds, different rollout"
        assert torch.equal(a.log_probs, b.log_probs) and torch.equal(a.stochastic, b.stochastic)
        other = self.rollout(sampler, policy, cond, step_salt=500)
        if self.stochastic:
            for i in range(len(self.prompts)):
                assert max_abs_diff(a.final[i], other.final[i]) > self.atol, (
                    f"row {i}: different step generators give the same sample")
        else:
            assert torch.equal(a.final, other.final), "a deterministic sampler must not use the step generators"

    def test_deterministic_rollout(self, sampler: Sampler, policy: Policy, cond: Conditioning) -> None:
        for epoch in self.epochs:
            a = self.rollout(sampler, policy, cond, deterministic=True, epoch=epoch)
            b = self.rollout(sampler, policy, cond, deterministic=True, epoch=epoch, step_salt=500)
            assert not bool(a.stochastic.any()), "deterministic=True must make every step deterministic"
            assert bool((a.log_probs == 0).all()), "deterministic rollouts have no log-probs (all 0)"
            assert torch.equal(a.final, b.final) and torch.equal(a.latents, b.latents), (
                "deterministic=True must not depend on the step generators")

    def test_rows_do_not_depend_on_the_batch(self, sampler: Sampler, policy: Policy, cond: Conditioning) -> None:
        batch = self.rollout(sampler, policy, cond)
        for r in range(len(self.prompts)):
            alone = self.rollout(sampler, policy, cond, rows=[r])
            assert max_abs_diff(alone.latents[0], batch.latents[r]) <= self.atol, (
                f"sample {r} rolled out alone differs from the same sample in a batch")
            assert max_abs_diff(alone.log_probs[0], batch.log_probs[r]) <= self.agreement_atol

    def test_step_distribution_matches_rollout(self, sampler: Sampler, policy: Policy, cond: Conditioning) -> None:
        t = self.rollout(sampler, policy, cond, deterministic=True)
        for i in range(sampler.steps):
            with torch.no_grad():
                d = sampler.step_distribution(policy, t.latents[:, i], t.sigmas, i, cond, stochastic=False)
            assert float(torch.as_tensor(d.std).detach().abs().max()) == 0.0, f"step {i}: stochastic=False must have std 0"
            assert max_abs_diff(d.mean, t.latents[:, i + 1]) <= self.atol, (
                f"step {i}: step_distribution(stochastic=False).mean is not the deterministic rollout's next state")

    def test_log_prob_agrees_with_rollout(self, sampler: Sampler, policy: Policy, cond: Conditioning) -> None:
        if not self.stochastic:
            t = self.rollout(sampler, policy, cond)
            with pytest.raises(ValueError):
                sampler.log_prob(policy, t, 0, cond)
            return
        checked = 0
        for epoch in self.epochs:
            t = self.rollout(sampler, policy, cond, epoch=epoch)
            for i in t.stochastic_steps():
                d = sampler.log_prob(policy, t, i, cond)
                assert d.log_prob is not None and tuple(d.log_prob.shape) == (len(self.prompts),)
                assert d.log_prob.dtype == torch.float32, f"log_prob dtype {d.log_prob.dtype}, expected float32"
                assert d.mean.shape == t.latents[:, i].shape, "step mean must have the latent's shape"
                assert float(torch.as_tensor(d.std).detach().min()) > 0, f"step {i} is stochastic but has std 0"
                gap = max_abs_diff(d.log_prob, t.log_probs[:, i])
                assert gap < self.agreement_atol, (
                    f"epoch {epoch} step {i}: log_prob recomputed differs from the rollout's by {gap:.3g}")
                checked += 1
        assert checked > 0, "no stochastic step to check"

    def test_log_prob_has_gradient(self, sampler: Sampler, policy: Policy, cond: Conditioning) -> None:
        if not self.stochastic:
            pytest.skip("a deterministic sampler has no log-probabilities")
        t = self.rollout(sampler, policy, cond)
        params = policy.trainable_parameters()
        _zero_grads(params)
        try:
            d = sampler.log_prob(policy, t, t.stochastic_steps()[0], cond)
            assert d.log_prob.requires_grad, "log_prob must be differentiable (it is recomputed with grad)"
            d.log_prob.sum().backward()
            assert any(p.grad is not None and bool((p.grad != 0).any()) for p in params), (
                "log_prob's gradient does not reach the policy")
        finally:
            _zero_grads(params)

    def test_log_prob_needs_kept_steps(self, sampler: Sampler, policy: Policy, cond: Conditioning) -> None:
        if not self.stochastic:
            pytest.skip("a deterministic sampler has no log-probabilities")
        t = self.rollout(sampler, policy, cond, keep="final")
        with pytest.raises(ValueError, match="keep"):
            sampler.log_prob(policy, t, t.stochastic_steps()[0], cond)


# --- reward -------------------------------------------------------------------------------------------------

class RewardContract(_ComponentContract):
    """Checks a reward against the `Reward` protocol on made-up images in [0, 1]."""

    kind = "reward"
    prompts: ClassVar[tuple[str, ...]] = ("a red square", "a blue circle", "a green triangle")
    group_size: ClassVar[int] = 2  # rollouts per prompt; batch = len(prompts) * group_size
    image_size: ClassVar[int] = 16
    frames: ClassVar[int] = 2  # video length, for rewards that handle videos

    @pytest.fixture(scope="class")
    @classmethod
    def reward(cls, registry: Registry) -> Reward:
        return cls.build(registry)

    @classmethod
    def samples(cls, images: torch.Tensor | None = None, videos: torch.Tensor | None = None,
                rows: Sequence[int] | None = None) -> Samples:
        """Samples of the prompts, each repeated group_size times, with group ids and metadata."""
        n = len(cls.prompts) * cls.group_size
        rows = list(range(n)) if rows is None else list(rows)
        groups = [r // cls.group_size for r in rows]
        return Samples(prompts=[cls.prompts[g] for g in groups],
                       images=None if images is None else images[rows],
                       videos=None if videos is None else videos[rows],
                       group_ids=groups, metadata=[{"row": r} for r in rows])

    @classmethod
    def images(cls, seed: int = 0) -> torch.Tensor:
        n, s = len(cls.prompts) * cls.group_size, cls.image_size
        return torch.rand(n, 3, s, s, generator=torch.Generator().manual_seed(seed))

    def _check_scores(self, scores: Any, n: int) -> None:
        assert isinstance(scores, torch.Tensor), f"score must return a tensor, got {type(scores).__name__}"
        assert scores.dtype == torch.float32, (f"score dtype {scores.dtype}, expected float32 (the core checks it "
                                               f"and never casts: `return scores.float()`)")
        assert tuple(scores.shape) == (n,), f"score shape {tuple(scores.shape)}, expected [{n}]"
        assert torch.isfinite(scores).all(), f"score has NaN or inf: {scores.tolist()}"

    def test_implements_protocol(self, reward: Reward) -> None:
        assert isinstance(reward, Reward), f"{type(reward).__name__} lacks members of flowfactory.types.Reward"
        for attr in ("groupwise", "handles_video"):
            value = getattr(type(reward), attr, None)
            assert isinstance(value, bool), f"{type(reward).__name__}.{attr} must be a bool class attribute"
        value = getattr(type(reward), "differentiable", False)
        assert isinstance(value, bool), f"{type(reward).__name__}.differentiable (optional) must be a bool class attribute"

    def test_scores_are_float32_per_sample(self, reward: Reward) -> None:
        images = self.images()
        self._check_scores(reward.score(self.samples(images)), images.shape[0])

    def test_scores_are_deterministic_and_leave_images_alone(self, reward: Reward) -> None:
        images = self.images()
        before = images.clone()
        a = reward.score(self.samples(images))
        b = reward.score(self.samples(images))
        assert torch.equal(images, before), "score modified the images it was given"
        assert max_abs_diff(a, b) <= self.atol, "the same samples scored twice differ"

    def test_scores_depend_on_the_images(self, reward: Reward) -> None:
        noisy = self.images()
        flat = torch.zeros_like(noisy)
        gap = max_abs_diff(reward.score(self.samples(noisy)), reward.score(self.samples(flat)))
        assert gap > self.atol, "random and black images get the same scores"

    def test_scores_do_not_depend_on_other_rows(self, reward: Reward) -> None:
        """A pointwise reward scores each sample alone; a groupwise one each group alone."""
        images = self.images()
        full = reward.score(self.samples(images))
        k = self.group_size
        parts = ([list(range(g * k, (g + 1) * k)) for g in range(len(self.prompts))] if reward.groupwise
                 else [[r] for r in range(images.shape[0])])
        for rows in parts:
            part = reward.score(self.samples(images, rows=rows))
            self._check_scores(part, len(rows))
            assert max_abs_diff(part, full[rows]) <= self.atol, f"scores of rows {rows} change with the batch"

    def test_differentiable_scores_keep_the_graph(self, reward: Reward) -> None:
        """`differentiable = True`: with images that require grad, the scores carry a finite, nonzero gradient to
        them and equal the scores under no_grad."""
        if not getattr(type(reward), "differentiable", False):
            pytest.skip("differentiable is False: the reward may detach its inputs")
        images = self.images().requires_grad_(True)
        with torch.no_grad():
            plain = reward.score(self.samples(images.detach()))
        scores = reward.score(self.samples(images))
        self._check_scores(scores.detach(), images.shape[0])
        assert scores.requires_grad, "differentiable = True, but the scores are detached from the images"
        assert max_abs_diff(scores.detach(), plain) <= self.atol, "scores with grad differ from those under no_grad"
        (grad,) = torch.autograd.grad(scores.sum(), images)
        assert bool(torch.isfinite(grad).all()), "the gradient to the images has NaN or inf"
        assert bool((grad != 0).any()), "the gradient to the images is zero everywhere"

    def test_videos(self, reward: Reward) -> None:
        if not reward.handles_video:
            pytest.skip("handles_video is False: core scores videos as the mean over frames")
        n, s = len(self.prompts) * self.group_size, self.image_size
        videos = torch.rand(n, self.frames, 3, s, s, generator=torch.Generator().manual_seed(1))
        self._check_scores(reward.score(self.samples(videos=videos)), n)


# --- optimizer ----------------------------------------------------------------------------------------------

class OptimizerContract(_ComponentContract):
    """Checks an RL algorithm against the `PolicyOptimizer` protocol on toy-policy rollouts from the sampler
    its requirements ask for (`flow-sde` for stochastic rollouts, `ode` otherwise)."""

    kind = "optimizer"
    policy_options: ClassVar[Mapping[str, Any]] = {"size": 8, "hidden": 16}
    sampler_steps: ClassVar[int] = 4
    sampler_options: ClassVar[Mapping[str, Any]] = {}  # options of the required sampler, over {"steps": ...}
    prompts: ClassVar[tuple[str, ...]] = ("a red square", "a blue circle")
    group_size: ClassVar[int] = 2  # batch = len(prompts) * group_size
    rows_independent: ClassVar[bool] = True  # a row's loss does not depend on its micro-batch companions
    # the run's rewards handed to an optimizer that defines bind_rewards, as the loop does: (name, options, weight)
    rewards: ClassVar[tuple[tuple[str, Mapping[str, Any], float], ...]] = (("brightness", {}, 1.0),)

    @pytest.fixture(scope="class")
    @classmethod
    def optimizer(cls, registry: Registry) -> PolicyOptimizer:
        optimizer = cls.build(registry)
        if isinstance(optimizer, OptimizerHooks):  # else test_implements_protocol says what is wrong
            from flowfactory.train.rewards import RewardSet

            optimizer.bind_rewards(RewardSet([(name, registry.get("reward", name).create(dict(options), cls.context()),
                                               weight) for name, options, weight in cls.rewards]))
        return optimizer

    @pytest.fixture(scope="class")
    @classmethod
    def policy(cls, registry: Registry) -> Policy:
        return _toy_policy(registry, cls.policy_options, cls.seed)

    @classmethod
    def sampler_name(cls, requirements: Requirements) -> str:
        """The sampler the rollouts come from: `flow-sde` for a stochastic rollout, `ode` otherwise."""
        return "flow-sde" if requirements.stochastic else "ode"

    @classmethod
    def make_sampler(cls, registry: Registry, name: str, options: Mapping[str, Any] | None = None) -> Sampler:
        """Sampler `name` with `sampler_steps` steps and `options`."""
        return registry.get("sampler", name).create({"steps": cls.sampler_steps, **dict(options or {})},
                                                    BuildContext(seed=cls.seed))

    @pytest.fixture(scope="class")
    @classmethod
    def sampler(cls, registry: Registry, optimizer: PolicyOptimizer) -> Sampler:
        return cls.make_sampler(registry, cls.sampler_name(optimizer.requirements), cls.sampler_options)

    @pytest.fixture(scope="class")
    @classmethod
    def batch(cls, optimizer: PolicyOptimizer, policy: Policy, sampler: Sampler) -> TrainBatch:
        return cls.make_batch(optimizer, policy, sampler)

    @classmethod
    def make_batch(cls, optimizer: PolicyOptimizer, policy: Policy, sampler: Sampler) -> TrainBatch:
        """One rollout batch kept as the optimizer requires (SDE or ODE), with fixed advantages in [-1, 1]."""
        need = optimizer.requirements
        prompts = [p for p in cls.prompts for _ in range(cls.group_size)]
        n = len(prompts)
        cond = policy.encode(prompts)
        noise = policy.noise(make_generators(range(n)))
        with optimizer.sampling(policy):
            traj = sampler.rollout(policy, cond, noise, make_generators(range(100, 100 + n)), keep=need.keep,
                                   deterministic=not need.stochastic)
        optimizer.on_rollout(policy)  # as the loop does, after the rollouts and before any update
        advantages = torch.linspace(-1.0, 1.0, n, dtype=torch.float32)
        return TrainBatch(trajectory=traj, cond=cond, advantages=advantages, fresh=True,
                          sample_keys=tuple((1, 0, i) for i in range(n)),  # (epoch, inner epoch, sample), as the loop
                          prompts=prompts)

    @staticmethod
    def sub_batch(batch: TrainBatch, rows: slice, fresh: bool | None = None) -> TrainBatch:
        return batch.select(rows, fresh=fresh)

    @staticmethod
    def _seeded_loss(optimizer: PolicyOptimizer, policy: Policy, sampler: Sampler, batch: TrainBatch,
                     unit: Any) -> LossOutput:
        """The loss with torch's global RNG seeded, so algorithms that draw noise in the loss repeat."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return optimizer.loss(policy, sampler, batch, unit)

    def test_implements_protocol(self, optimizer: PolicyOptimizer) -> None:
        assert isinstance(optimizer, OptimizerHooks), (
            f"{type(optimizer).__name__} must subclass flowfactory.types.OptimizerHooks (the run refuses it otherwise)")
        assert isinstance(optimizer, PolicyOptimizer), (
            f"{type(optimizer).__name__} lacks members of flowfactory.types.PolicyOptimizer")
        need = optimizer.requirements
        assert isinstance(need, Requirements), f"requirements must be a flowfactory.types.Requirements, got {need!r}"
        assert need.keep in ("steps", "final") and isinstance(need.stochastic, bool)

    def test_setup_accepts_the_required_sampler(self, optimizer: PolicyOptimizer, policy: Policy,
                                                sampler: Sampler) -> None:
        assert optimizer.setup(policy, sampler) is None

    def test_setup_rejects_a_deterministic_sampler(self, registry: Registry, optimizer: PolicyOptimizer,
                                                   policy: Policy) -> None:
        if not optimizer.requirements.stochastic:
            pytest.skip("the algorithm works with deterministic rollouts")
        with pytest.raises(FlowFactoryError):
            optimizer.setup(policy, self.make_sampler(registry, "ode"))

    def test_units_are_not_empty(self, optimizer: PolicyOptimizer, batch: TrainBatch) -> None:
        units = optimizer.units(batch)
        assert isinstance(units, list) and units, f"units() must be a non-empty list, got {units!r}"

    def test_loss_is_per_sample_and_finite(self, optimizer: PolicyOptimizer, policy: Policy, sampler: Sampler,
                                           batch: TrainBatch) -> None:
        n = len(batch.advantages)
        params = policy.trainable_parameters()
        try:
            for fresh in (True, False):
                b = self.sub_batch(batch, slice(None), fresh=fresh)
                for unit in optimizer.units(b):
                    out = optimizer.loss(policy, sampler, b, unit)
                    assert isinstance(out, LossOutput), f"loss must return a LossOutput, got {type(out).__name__}"
                    assert isinstance(out.loss, torch.Tensor) and tuple(out.loss.shape) == (n,), (
                        f"unit {unit!r}: loss shape {tuple(getattr(out.loss, 'shape', ()))}, expected [{n}]")
                    assert out.loss.is_floating_point() and torch.isfinite(out.loss).all(), (
                        f"unit {unit!r}: loss is not finite: {out.loss.tolist()}")
                    for name, value in {**out.metrics, **out.max_metrics}.items():
                        value = torch.as_tensor(value)
                        assert value.numel() == 1 and bool(torch.isfinite(value).all()), (
                            f"metric {name!r} must be a finite scalar, got {value!r}")
        finally:
            _zero_grads(params)

    def test_loss_reaches_trainable_parameters(self, optimizer: PolicyOptimizer, policy: Policy,
                                               sampler: Sampler, batch: TrainBatch) -> None:
        params = policy.trainable_parameters()
        _zero_grads(params)
        try:
            for unit in optimizer.units(batch):
                out = optimizer.loss(policy, sampler, batch, unit)
                assert out.loss.requires_grad, f"unit {unit!r}: the loss is detached from the policy"
                out.loss.mean().backward()
            assert all(p.grad is not None for p in params), "some trainable parameters got no gradient"
            assert all(bool(torch.isfinite(p.grad).all()) for p in params), "a gradient has NaN or inf"
            assert any(bool((p.grad != 0).any()) for p in params), "every gradient is zero"
        finally:
            _zero_grads(params)

    def test_micro_batches(self, optimizer: PolicyOptimizer, policy: Policy, sampler: Sampler,
                           batch: TrainBatch) -> None:
        n = len(batch.advantages)
        rows = slice(1, n)
        part = self.sub_batch(batch, rows)
        with torch.no_grad():
            # each side draws its own units, as the loop does for each micro-batch: per-row randomness keyed
            # by TrainBatch.sample_keys makes a row's units, and so its loss, the same in either
            for unit, full_unit in zip(optimizer.units(part), optimizer.units(batch), strict=True):
                small = self._seeded_loss(optimizer, policy, sampler, part, unit).loss
                assert tuple(small.shape) == (n - 1,), f"a micro-batch of {n - 1} rows gives shape {tuple(small.shape)}"
                if self.rows_independent:
                    full = self._seeded_loss(optimizer, policy, sampler, batch, full_unit).loss
                    assert max_abs_diff(small, full[rows]) <= self.atol, (
                        f"unit {unit!r}: a row's loss changes with its micro-batch; set `rows_independent = "
                        "False` if that is intended")
