"""A pytest suite for diffusers-based policy plugins: options, build errors, parity with the stock pipeline,
LoRA and full finetune, and saves that stock diffusers loads.

A model plugin's test file subclasses it and says where its model is in diffusers:

    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from flowfactory_diffusers.testing import DiffusersPolicyContract
    from flowfactory_sd3.tiny import build_tiny_pipeline

    class TestSD3Diffusers(DiffusersPolicyContract):
        component = "sd3"
        pipeline_class = StableDiffusion3Pipeline
        transformer_class = SD3Transformer2DModel
        tiny_builder = staticmethod(build_tiny_pipeline)
        call_kwargs = {"height": 32, "width": 32, "max_sequence_length": 16}

What `PolicyContract` checks against the `Policy` protocol, this suite checks against diffusers itself: an ODE
rollout of the `preset: tiny` policy equals the stock pipeline's `__call__` from the same latents (the tiny
builder's pipeline written with `save_pretrained` and read back with `from_pretrained`), a saved LoRA loads with
`load_lora_weights` and a saved full finetune with `transformer_class.from_pretrained`. What is the model's own
(exact parameter counts, dead modules, size errors, encoders, schedules) stays in the plugin's tests.

As in `flowfactory.testing.contracts`, policies are built through the registry exactly as `ff run` builds them,
the base class is not named `Test*`, knobs are class attributes and fixtures are class-scoped and overridable.
This module imports diffusers only inside tests.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import subprocess
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from flowfactory.errors import FlowFactoryError
from flowfactory.prompts import Prompt, texts
from flowfactory.registry import Registry
from flowfactory.samplers.flow import ODESampler
from flowfactory.testing.contracts import _ComponentContract, make_generators
from flowfactory.types import Conditioning, Policy

Call = Mapping[str, Any] | Callable[[Any], Mapping[str, Any]]

# Bad option values every diffusers policy rejects, and the key its error must name.
COMMON_BAD_OPTIONS: tuple[tuple[Mapping[str, Any], str], ...] = (
    ({"preset": "tiny", "lorra": {}}, "lorra"),
    ({"preset": "tiny", "lora": {"rank": 4, "scale": 2}}, "lora.scale"),
    ({"preset": "tiny", "lora": {"rank": 0}}, "lora.rank"),
    ({"preset": "huge"}, "preset"),
    ({"preset": "tiny", "dtype": "float64"}, "dtype"),
)

HEAVY_MODULES = ("torch", "diffusers", "transformers", "peft")  # what an entry-point module must not import


# --- helpers ------------------------------------------------------------------------------------------------

def perturb(params: Sequence[nn.Parameter], seed: int, scale: float = 0.05) -> None:
    """Add seeded Gaussian noise in place: a stand-in for a training step."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))


def lora_params(policy: Any, which: str) -> list[nn.Parameter]:
    """The transformer's LoRA `A` or `B` matrices."""
    return [p for n, p in policy.transformer.named_parameters() if f"lora_{which}" in n]


def velocity_loss(policy: Policy, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    return (policy.velocity(x, torch.tensor(0.6), cond) ** 2).mean()


def _resolve(value: Any) -> Any:
    """A class or function given as itself or as an import path "module:name" (or "module.name")."""
    if not isinstance(value, str):
        return value
    module, _, name = value.rpartition(":") if ":" in value else value.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model in an annotation such as `LoraOptions | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if (found := _model_in(arg)) is not None:
                return found
    return None


class DiffusersPolicyContract(_ComponentContract):
    """Checks a diffusers-based policy plugin against stock diffusers, on its `preset: tiny`.

    Class attributes a subclass sets:
      component          the registered policy name ("sd3")
      pipeline_class     the diffusers pipeline class (or "module:Name") that loads the tiny folder and LoRA saves
      transformer_class  the diffusers transformer class (or "module:Name") that loads full-finetune saves
      tiny_builder       seed -> the tiny preset's pipeline (wrap a function in `staticmethod`, or "module:name")
      call_kwargs        extra pipeline `__call__` kwargs (sizes, sequence length, guidance): a dict, or
                         policy -> dict when they follow the policy's options (CFG scale, negative prompt)
      output             the pipeline output's field: "images" or "frames"
      model_options      options with which `model: <the saved tiny pipeline>` builds the tiny preset's policy
                         (sizes, sequence length, guidance; `dtype: float32` is added)
    and may set:
      options            options of every build, before the test's own (default {"preset": "tiny"})
      lora               the LoRA options of the LoRA tests
      cfg_options        options that turn classifier-free guidance on; {} (no CFG) skips the CFG checks
      parity_steps       the step counts at which an ODE rollout must equal the stock pipeline
      bad_options        (raw options, key its error must name); extend COMMON_BAD_OPTIONS
      latent_dtype       the latents' dtype with a bfloat16 base (default None: bfloat16 too)
      readme             the plugin's README.md: its yaml configs validate, its option table is complete
      entry_module       the entry-point module (default: the package name with "_" for "-")
      prompts, seed      the batch's prompts and the build seed; parity_atol the tolerance of "equal" outputs.
                         `prompts` may be `flowfactory.prompts.Prompt` records with input images (an editing
                         model): records need their image files, so set `cls.prompts` in a class-scoped
                         classmethod fixture, and pass the images to the pipeline in `stock_inputs`
      encode_option_changes  options that change what `encode` returns, so each must change the conditioning
                         fingerprint (default: a shorter max_sequence_length, bfloat16; `cfg_options` are added)
    Hooks to override: `stock_pipeline(folder, policy)` (load the stock pipeline as the policy's equal),
    `stock_inputs(policy)` (the pipeline `__call__` kwargs carrying the prompts' input images),
    `as_module(policy, transformer)` (what `policy.module` is to run a bare transformer),
    `frozen_parts(policy)` (the modules that must never train: text encoders and VAE).
    The options and LoRA options models are the registered ones (`spec.options` and its `lora` field's model).
    """

    kind = "policy"
    options: ClassVar[Mapping[str, Any]] = {"preset": "tiny"}
    pipeline_class: ClassVar[type | str]
    transformer_class: ClassVar[type | str]
    tiny_builder: ClassVar[Callable[[int], Any] | str]
    call_kwargs: ClassVar[Call] = {}
    output: ClassVar[str] = "images"
    model_options: ClassVar[Mapping[str, Any]] = {}
    lora: ClassVar[Mapping[str, Any]] = {"rank": 4, "alpha": 8.0}
    cfg_options: ClassVar[Mapping[str, Any]] = {}
    parity_steps: ClassVar[tuple[int, ...]] = (1, 5)
    bad_options: ClassVar[Sequence[tuple[Mapping[str, Any], str]]] = COMMON_BAD_OPTIONS
    latent_dtype: ClassVar[torch.dtype | None] = None
    readme: ClassVar[Path | None] = None
    entry_module: ClassVar[str | None] = None
    prompts: ClassVar[tuple[str | Prompt, ...]] = ("a red square", "a blue circle")
    parity_atol: ClassVar[float] = 1e-4  # |ours - stock pipeline's|, and the least change counted as "different"
    encode_option_changes: ClassVar[Sequence[Mapping[str, Any]]] = ({"max_sequence_length": 12}, {"dtype": "bfloat16"})

    # --- building ---------------------------------------------------------------------------------------

    @classmethod
    def make(cls, registry: Registry, seed: int | None = None, **overrides: Any) -> Any:
        """Build the policy through the registry with `options` updated by `overrides` (a `model` drops the
        preset)."""
        raw = {**copy.deepcopy(dict(cls.options)), **copy.deepcopy(overrides)}
        if "model" in overrides:
            raw.pop("preset", None)
        return registry.get(cls.kind, cls._name()).create(raw, cls.context(seed))

    @classmethod
    def _name(cls) -> str:
        if not cls.component:
            raise TypeError(f"{cls.__name__} must set `component` to the registered policy name")
        return cls.component

    @classmethod
    def _attr(cls, name: str) -> Any:
        """A class attribute as set (a function is not bound; an import path is imported)."""
        for klass in cls.__mro__:
            if name in vars(klass):
                value = vars(klass)[name]
                return _resolve(value.__func__ if isinstance(value, staticmethod) else value)
        raise TypeError(f"{cls.__name__} must set `{name}`; see DiffusersPolicyContract's docstring")

    @classmethod
    def options_models(cls, registry: Registry) -> tuple[type[BaseModel], type[BaseModel]]:
        """The policy's options model and the model of its `lora` option."""
        model = registry.get(cls.kind, cls._name()).options
        lora = _model_in(model.model_fields["lora"].annotation) if "lora" in model.model_fields else None
        assert lora is not None, f"{model.__name__} has no `lora` option with a pydantic model"
        return model, lora

    @staticmethod
    def options_models_of(spec: Any) -> list[tuple[type[BaseModel], type[BaseModel]]]:
        """[(options model, its `lora` option's model)] of a registered policy spec (empty without a `lora`)."""
        model = spec.options
        lora = _model_in(model.model_fields["lora"].annotation) if "lora" in model.model_fields else None
        return [(model, lora)] if lora is not None else []

    def stock_pipeline(self, folder: Path, policy: Any) -> Any:
        """The stock pipeline loaded from `folder`, set up as `policy` runs (override for a pipeline setting
        that is not saved)."""
        pipe = self._attr("pipeline_class").from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def as_module(self, policy: Any, transformer: nn.Module) -> nn.Module:
        """What `policy.module` becomes so that `policy.velocity` runs `transformer` (a diffusers transformer)."""
        return transformer

    def frozen_parts(self, policy: Any) -> list[nn.Module]:
        """The modules that never train: every module of the pipeline but its transformer(s), and the VAE."""
        parts = [m for name, m in policy.pipe.components.items()
                 if isinstance(m, nn.Module) and not name.startswith("transformer")]
        return [*parts, *([policy.vae] if all(policy.vae is not m for m in parts) else [])]

    def pipeline_kwargs(self, policy: Any) -> dict[str, Any]:
        """`call_kwargs` for `policy`."""
        extra = self._attr("call_kwargs")
        return dict(extra(policy) if callable(extra) else extra)

    def stock_inputs(self, policy: Any) -> dict[str, Any]:
        """Pipeline `__call__` kwargs that carry the prompts' input images (e.g. an editing pipeline's `image`, as
        that pipeline takes them); none for text prompts."""
        return {}

    def stock_call(self, pipe: Any, policy: Any, steps: int, z: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The stock pipeline's output from latents `z` in `steps` steps, as a [0, 1] tensor."""
        kwargs = {**self.pipeline_kwargs(policy), **self.stock_inputs(policy), "output_type": "pt", **kwargs}
        out = pipe(prompt=texts(self.prompts), num_inference_steps=steps, latents=z.clone(), **kwargs)
        return getattr(out, self.output)

    def rollout(self, policy: Any, steps: int, z: torch.Tensor) -> torch.Tensor:
        """The final latents of a deterministic ODE rollout from `z`."""
        n = len(self.prompts)
        traj = ODESampler(steps).rollout(policy, policy.encode(list(self.prompts)), z, make_generators(range(n)),
                                         keep="final", deterministic=True)
        return traj.final

    @contextmanager
    def running(self, policy: Any, transformer: nn.Module) -> Iterator[None]:
        """Run `policy.velocity` through `transformer` inside the block (no grad), then restore the module."""
        module = policy.module
        policy.module = self.as_module(policy, transformer)
        try:
            with torch.no_grad():
                yield
        finally:
            policy.module = module

    def _noise(self, policy: Policy, offset: int = 0) -> torch.Tensor:
        return policy.noise(make_generators(range(offset, offset + len(self.prompts))))

    def _cond(self, policy: Policy) -> Conditioning:
        return policy.encode(list(self.prompts))

    @pytest.fixture(scope="class")
    @classmethod
    def stock_dir(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        """The tiny builder's seed-`seed` pipeline, written with save_pretrained."""
        path = tmp_path_factory.mktemp(f"stock-{cls._name()}")
        cls._attr("tiny_builder")(cls.seed).save_pretrained(path)
        return path

    # --- options ----------------------------------------------------------------------------------------

    def _error_text(self, registry: Registry, raw: Mapping[str, Any]) -> str:
        model, _ = self.options_models(registry)
        with pytest.raises(ValidationError) as info:
            model.model_validate(dict(raw))
        return str(info.value)

    def test_exactly_one_of_model_and_preset(self, registry: Registry) -> None:
        for raw, got in (({}, "neither"), ({"model": "x/y", "preset": "tiny"}, "both")):
            text = self._error_text(registry, raw)
            assert "`model`" in text and "`preset`" in text and got in text, text

    def test_revision_needs_model(self, registry: Registry) -> None:
        assert "`revision`" in self._error_text(registry, {"preset": "tiny", "revision": "main"})

    def test_bad_values_name_their_key(self, registry: Registry) -> None:
        for raw, key in self.bad_options:
            assert key in self._error_text(registry, raw), f"the error for {raw} does not name {key!r}"

    def test_every_option_is_described(self, registry: Registry) -> None:
        for model in self.options_models(registry):
            undocumented = [name for name, f in model.model_fields.items() if not f.description]
            assert undocumented == [], f"{model.__name__}: {undocumented}"

    def test_readme_configs_validate_and_table_lists_every_option(self, registry: Registry) -> None:
        """A package README may document several of its policies (a model and its variants): each yaml block
        validates against the options of the policy it names, which must be one of the package's; at least two
        name this one; the option tables list every option of this policy and nothing no policy of the package
        has."""
        if self.readme is None:
            pytest.skip("no `readme` set")
        model, lora = self.options_models(registry)
        spec = registry.get(self.kind, self._name())
        siblings = {name: registry.get(self.kind, name) for name in registry.names(self.kind)}
        siblings = {name: s for name, s in siblings.items() if s.package == spec.package}
        text = Path(self.readme).read_text()
        blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
        import yaml

        own = 0
        for block in blocks:
            policy = yaml.safe_load(block)["policy"]
            assert policy["name"] in siblings, f"{policy['name']!r} is not a policy of {spec.package}"
            siblings[policy["name"]].options.model_validate(policy["options"])
            own += policy["name"] == self.component
        assert own >= 2, f"the README has {own} yaml config(s) of {self.component}; give at least two"
        rows = set(re.findall(r"^\| `([\w.]+)`(?:, `([\w.]+)`)? \|", text, flags=re.M))
        documented = {key for row in rows for key in row if key}
        expected = set(model.model_fields) | {f"lora.{k}" for k in lora.model_fields}
        assert expected <= documented, f"undocumented options: {sorted(expected - documented)}"
        known: set[str] = set()
        for sibling in siblings.values():
            for options, lora_options in self.options_models_of(sibling):
                known |= set(options.model_fields) | {f"lora.{k}" for k in lora_options.model_fields}
        assert documented <= known, f"documented options no policy of {spec.package} has: {sorted(documented - known)}"

    def test_entry_point_imports_no_torch(self, registry: Registry) -> None:
        module = self.entry_module or registry.get(self.kind, self._name()).package.replace("-", "_")
        code = (f"import sys, {module}\n"
                f"heavy = [m for m in {HEAVY_MODULES!r} if m in sys.modules]\n"
                "print(','.join(heavy))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "", f"importing {module} imports {out.stdout.strip()}"

    # --- build errors -----------------------------------------------------------------------------------

    def test_missing_model_folder(self, registry: Registry, tmp_path: Path) -> None:
        with pytest.raises(FlowFactoryError, match="option model=.*no such folder.*save_pretrained"):
            registry.get(self.kind, self._name()).create({"model": str(tmp_path / "nope")})

    def test_folder_without_model_index(self, registry: Registry, tmp_path: Path) -> None:
        with pytest.raises(FlowFactoryError, match="model_index.json"):
            registry.get(self.kind, self._name()).create({"model": str(tmp_path)})

    def test_model_path_loads_a_saved_pipeline(self, registry: Registry, stock_dir: Path) -> None:
        loaded = self.make(registry, model=str(stock_dir), dtype="float32", **self.model_options)
        preset = self.make(registry)
        x, sigma = self._noise(preset), torch.tensor(0.5)
        with torch.no_grad():
            torch.testing.assert_close(loaded.velocity(x, sigma, self._cond(loaded)),
                                       preset.velocity(x, sigma, self._cond(preset)), atol=0, rtol=0)

    # --- parity with the stock pipeline -----------------------------------------------------------------

    def test_ode_rollout_equals_stock_pipeline(self, registry: Registry, stock_dir: Path) -> None:
        policy = self.make(registry)  # the same weights as stock_dir, built independently
        pipe = self.stock_pipeline(stock_dir, policy)
        z = self._noise(policy)
        for steps in self.parity_steps:
            ours = policy.decode(self.rollout(policy, steps, z))
            theirs = self.stock_call(pipe, policy, steps, z)
            assert ours.shape == theirs.shape and ours.shape[0] == len(self.prompts)
            assert (ours - theirs).abs().max() < self.parity_atol, f"{steps} steps"
            assert ours.std() > 0.01  # not a constant output

    def test_cfg_rollout_equals_stock_pipeline(self, registry: Registry, stock_dir: Path) -> None:
        """With CFG on: conditional and unconditional passes with the negative prompt, as the pipeline does;
        the latents match too, and differ from the pipeline's without CFG (so the check has teeth)."""
        if not self.cfg_options:
            pytest.skip("no `cfg_options`: the policy has no classifier-free guidance")
        policy, plain = self.make(registry, **self.cfg_options), self.make(registry)
        pipe = self.stock_pipeline(stock_dir, policy)
        steps, z = self.parity_steps[-1], self._noise(policy)
        final = self.rollout(policy, steps, z)
        theirs = self.stock_call(pipe, policy, steps, z)
        assert (policy.decode(final) - theirs).abs().max() < self.parity_atol
        latents = self.stock_call(pipe, policy, steps, z, output_type="latent")
        assert (final - latents).abs().max() < self.parity_atol
        no_cfg = self.stock_call(pipe, plain, steps, z, output_type="latent")
        assert (final - no_cfg).abs().max() > 1e-3  # CFG changed the sample

    # --- LoRA -------------------------------------------------------------------------------------------

    def test_lora_trainable_parameters_are_float32_adapters(self, registry: Registry) -> None:
        policy = self.make(registry, lora=dict(self.lora))
        named = {id(p): n for n, p in policy.transformer.named_parameters()}
        trainable = policy.trainable_parameters()
        assert trainable and all("lora_" in named.get(id(p), "") for p in trainable)
        assert all(p.dtype == torch.float32 and p.requires_grad for p in trainable)
        assert sum(p.numel() for p in trainable) < 0.05 * sum(p.numel() for p in policy.transformer.parameters())

    def test_lora_gradient_reaches_lora_and_only_lora(self, registry: Registry) -> None:
        policy = self.make(registry, lora=dict(self.lora))
        cond, x = self._cond(policy), self._noise(policy)
        velocity_loss(policy, x, cond).backward()
        # B starts at zero, so only B has a gradient at init; A's gradient flows through B
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params(policy, "B"))
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in lora_params(policy, "A"))
        perturb(lora_params(policy, "B"), seed=1)
        for p in policy.trainable_parameters():
            p.grad = None
        velocity_loss(policy, x, cond).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())
        base = [n for n, p in policy.transformer.named_parameters() if "lora_" not in n and p.grad is not None]
        frozen = [p for m in self.frozen_parts(policy) for p in m.parameters()]
        assert base == [] and all(p.grad is None for p in frozen)

    def test_lora_reference_is_the_unadapted_model(self, registry: Registry) -> None:
        policy, plain = self.make(registry, lora=dict(self.lora)), self.make(registry)  # same base weights
        cond, x, sigma = self._cond(policy), self._noise(policy), torch.tensor(0.6)
        with torch.no_grad():
            base = plain.velocity(x, sigma, cond)
            torch.testing.assert_close(policy.velocity(x, sigma, cond), base, atol=1e-6, rtol=0)
        perturb(policy.trainable_parameters(), seed=2)
        with torch.no_grad():
            adapted = policy.velocity(x, sigma, cond)
        assert (adapted - base).abs().max() > 1e-3
        with policy.reference():
            ref = policy.velocity(x, sigma, cond)
            assert not ref.requires_grad
        torch.testing.assert_close(ref, base, atol=1e-6, rtol=0)
        # leaving the context restores the adapters and their trainability
        with torch.no_grad():
            torch.testing.assert_close(policy.velocity(x, sigma, cond), adapted, atol=0, rtol=0)
        assert all(p.requires_grad for p in policy.trainable_parameters())

    def test_saved_lora_loads_into_a_stock_pipeline(self, registry: Registry, stock_dir: Path,
                                                    tmp_path: Path) -> None:
        """Without CFG and (if the policy has it) with: the stock pipeline with the saved LoRA loaded gives the
        policy's output, and its adapted transformer the policy's velocity."""
        for i, extra in enumerate([{}, *([self.cfg_options] if self.cfg_options else [])]):
            policy = self.make(registry, lora=dict(self.lora), **extra)
            perturb(policy.trainable_parameters(), seed=3, scale=0.1)
            out = tmp_path / f"final-{i}"
            policy.save(str(out))
            assert (out / "pytorch_lora_weights.safetensors").is_file()
            assert "load_lora_weights" in (out / "README.md").read_text()
            assert json.loads((out / "flowfactory.json").read_text())["kind"] == "lora"

            steps, z = 3, self._noise(policy)
            ours = policy.decode(self.rollout(policy, steps, z))
            pipe = self.stock_pipeline(stock_dir, policy)
            untrained = self.stock_call(pipe, policy, steps, z)
            pipe.load_lora_weights(str(out))
            theirs = self.stock_call(pipe, policy, steps, z)
            assert (ours - theirs).abs().max() < self.parity_atol, f"options {extra}"
            assert (ours - untrained).abs().max() > 1e-3  # the adapter changed the output
            cond, x, sigma = self._cond(policy), self._noise(policy, offset=5), torch.tensor(0.5)
            with self.running(policy, pipe.transformer):
                stock_v = policy.velocity(x, sigma, cond)
            with torch.no_grad():
                torch.testing.assert_close(stock_v, policy.velocity(x, sigma, cond), atol=1e-5, rtol=0)

    def test_lora_init_is_deterministic_from_the_seed(self, registry: Registry) -> None:
        lora = dict(self.lora)
        a, b, c = self.make(registry, lora=lora), self.make(registry, lora=lora), self.make(registry, 1, lora=lora)
        for pa, pb, pc in zip(*(lora_params(p, "A") for p in (a, b, c)), strict=True):
            assert torch.equal(pa, pb) and not torch.equal(pa, pc)

    def test_gradient_checkpointing_gives_the_same_gradients(self, registry: Registry) -> None:
        grads = []
        for ckpt in (False, True):
            policy = self.make(registry, lora=dict(self.lora), gradient_checkpointing=ckpt)
            assert policy.transformer.gradient_checkpointing is ckpt
            perturb(policy.trainable_parameters(), seed=4)
            velocity_loss(policy, self._noise(policy), self._cond(policy)).backward()
            grads.append([p.grad.clone() for p in policy.trainable_parameters()])
        for g0, g1 in zip(*grads, strict=True):
            torch.testing.assert_close(g1, g0, atol=1e-6, rtol=1e-5)

    def test_low_precision_base_keeps_float32_adapters(self, registry: Registry) -> None:
        policy = self.make(registry, lora=dict(self.lora), dtype="bfloat16")
        assert policy.compute_dtype == torch.bfloat16
        assert all(p.dtype == torch.bfloat16 for m in self.frozen_parts(policy) for p in m.parameters())
        assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
        x = self._noise(policy)
        # stored latents in the compute dtype unless the pipeline keeps them wider (CPU autocast cannot mix)
        assert x.dtype == (self.latent_dtype or torch.bfloat16)
        v = policy.velocity(x, torch.tensor(0.5), self._cond(policy))
        assert v.shape == x.shape and v.dtype == x.dtype and torch.isfinite(v).all()
        v.float().pow(2).mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params(policy, "B"))

    def test_flow_sde_log_probs_recompute_with_grad(self, registry: Registry) -> None:
        """GRPO's ratio starts at 1: the log-prob recomputed with grad equals the rollout's, step by step (with
        CFG when the policy has it)."""
        policy = self.make(registry, lora=dict(self.lora), **self.cfg_options)
        perturb(policy.trainable_parameters(), seed=7)
        sampler = registry.get("sampler", "flow-sde").create({"steps": 4}, self.context(0))
        cond, n = self._cond(policy), len(self.prompts)
        traj = sampler.rollout(policy, cond, self._noise(policy), make_generators(range(10, 10 + n)))
        assert traj.latents is not None and traj.latents.shape == (n, 5, *policy.latent_shape)
        assert traj.stochastic_steps(), "flow-sde made no stochastic step"
        for step in traj.stochastic_steps():
            dist = sampler.log_prob(policy, traj, step, cond)
            torch.testing.assert_close(dist.log_prob.detach(), traj.log_probs[:, step], atol=1e-4, rtol=0)
            assert dist.log_prob.requires_grad

    # --- full finetune ----------------------------------------------------------------------------------

    def test_full_finetune_trains_in_float32(self, registry: Registry) -> None:
        """The transformer's weights train (which ones are dead is the model's own test); nothing else does."""
        policy = self.make(registry)
        trainable = policy.trainable_parameters()
        in_transformer = {id(p) for p in policy.transformer.parameters()}
        assert trainable and all(id(p) in in_transformer for p in trainable)
        assert all(p.dtype == torch.float32 and p.requires_grad for p in trainable)
        v = policy.velocity(self._noise(policy), torch.tensor(0.6), self._cond(policy))
        (v**2).mean().backward()
        assert all(p.grad is not None for p in trainable)
        assert sum(float(p.grad.abs().sum()) > 0 for p in trainable) > 0.95 * len(trainable)
        assert all(p.grad is None for m in self.frozen_parts(policy) for p in m.parameters())

    def test_frozen_parts_take_no_gradient(self, registry: Registry) -> None:
        policy = self.make(registry)
        for part in self.frozen_parts(policy):
            assert not part.training and not any(p.requires_grad for p in part.parameters())

    def test_full_reference_is_the_frozen_initial_model(self, registry: Registry) -> None:
        policy = self.make(registry)
        cond, x, sigma = self._cond(policy), self._noise(policy), torch.tensor(0.4)
        with torch.no_grad():
            initial = policy.velocity(x, sigma, cond)
        with policy.reference():
            torch.testing.assert_close(policy.velocity(x, sigma, cond), initial, atol=0, rtol=0)
        perturb(policy.trainable_parameters(), seed=5, scale=0.02)
        with torch.no_grad():
            trained = policy.velocity(x, sigma, cond)
        assert (trained - initial).abs().max() > 1e-3
        with policy.reference():
            ref = policy.velocity(x, sigma, cond)
            assert not ref.requires_grad
        torch.testing.assert_close(ref, initial, atol=0, rtol=0)
        assert all(p.requires_grad for p in policy.trainable_parameters())

    def test_full_finetune_without_reference_keeps_no_frozen_copy(self, registry: Registry) -> None:
        """BuildContext(reference=False) (the run's algorithm has no KL term): no second transformer in memory,
        the same training velocity, and reference() refuses with the reason; LoRA's reference still works."""
        import dataclasses

        spec = registry.get(self.kind, self._name())
        lean = spec.create(dict(self.options), dataclasses.replace(self.context(None), reference=False))
        full = self.make(registry)

        def held(policy: Any) -> int:  # bytes of every distinct tensor the policy's modules hold
            seen: dict[int, int] = {}
            for m in (policy.module, getattr(policy, "_frozen_copy", None)):
                for t in [*m.parameters(), *m.buffers()] if m is not None else []:
                    seen[t.data_ptr()] = t.numel() * t.element_size()
            return sum(seen.values())

        weights = sum(p.numel() * p.element_size() for p in full.trainable_parameters())
        assert held(full) - held(lean) >= weights  # the frozen copy is at least the trained weights again
        cond, x, sigma = self._cond(lean), self._noise(lean), torch.tensor(0.5)
        with torch.no_grad():
            torch.testing.assert_close(lean.velocity(x, sigma, cond), full.velocity(x, sigma, cond), atol=0, rtol=0)
        with pytest.raises(FlowFactoryError, match="kl_beta"):
            with lean.reference():
                pass
        adapted = spec.create({**self.options, "lora": dict(self.lora)},
                              dataclasses.replace(self.context(None), reference=False))
        with adapted.reference():  # adapters off: free, so always there
            adapted.velocity(x, sigma, cond)

    def test_full_save_reloads_with_from_pretrained(self, registry: Registry, tmp_path: Path) -> None:
        policy = self.make(registry)
        perturb(policy.trainable_parameters(), seed=6)
        out = tmp_path / "final"
        policy.save(str(out))
        transformer_class = self._attr("transformer_class")
        loaded = transformer_class.from_pretrained(out / "transformer")
        ours, theirs = policy.transformer.state_dict(), loaded.state_dict()
        assert ours.keys() == theirs.keys()
        for name, tensor in ours.items():
            assert torch.equal(tensor, theirs[name]), name
        x, cond, sigma = self._noise(policy), self._cond(policy), torch.tensor(0.5)
        with self.running(policy, loaded):
            from_disk = policy.velocity(x, sigma, cond)
        with torch.no_grad():
            torch.testing.assert_close(from_disk, policy.velocity(x, sigma, cond), atol=0, rtol=0)
        assert json.loads((out / "flowfactory.json").read_text())["kind"] == "full"
        assert f"{transformer_class.__name__}.from_pretrained" in (out / "README.md").read_text()

    def test_fsdp_block_classes_come_from_no_split_modules(self, registry: Registry) -> None:
        policy = self.make(registry)
        names = [c.__name__ for c in policy.fsdp_block_classes]
        assert names and names == list(policy.transformer._no_split_modules)

    # --- memory: deferred and offloaded text encoders, the conditioning fingerprint, chunked VAE decode ------

    def test_offloaded_text_encoders_encode_the_same_and_go_back_to_cpu(self, registry: Registry,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
        plain, offloaded = self.make(registry), self.make(registry, offload_text_encoders=True)
        moves: list[str] = []
        move = offloaded._move_text_encoders

        def spy(device: torch.device) -> None:
            moves.append(torch.device(device).type)
            move(device)

        monkeypatch.setattr(offloaded, "_move_text_encoders", spy)
        ours, theirs = offloaded.encode(list(self.prompts)), plain.encode(list(self.prompts))
        assert moves == [offloaded.device.type, "cpu"]  # to the device for the encode, back after it
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        encoders = offloaded.text_encoder_modules()
        assert encoders and all(p.device.type == "cpu" for m in encoders.values() for p in m.parameters())
        offloaded.to(offloaded.device)  # moving the policy leaves them on the CPU
        assert all(p.device.type == "cpu" for m in encoders.values() for p in m.parameters())

    def test_vae_decode_in_chunks_gives_the_same_samples(self, registry: Registry,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
        whole = self.make(registry)
        x = torch.cat([self._noise(whole), self._noise(whole, offset=len(self.prompts))])[:3]
        expected = whole.decode(x)
        for chunk, sizes in ((1, [1, 1, 1]), (2, [2, 1]), (5, [3])):
            policy = self.make(registry, vae_decode_chunk=chunk)
            seen: list[int] = []
            decode = policy.vae.decode

            def spy(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                seen.append(z.shape[0])  # noqa: B023 (called inside this iteration only)
                return decode(z, *args, **kwargs)  # noqa: B023

            monkeypatch.setattr(policy.vae, "decode", spy)
            out = policy.decode(x)
            assert seen == sizes and out.shape == expected.shape and out.dtype == expected.dtype
            # a batch of another size may take another convolution kernel: equal up to fp32 rounding of [0, 1]
            # pixels (1.07e-6 seen on a 3D VAE with one thread)
            torch.testing.assert_close(out, expected, atol=4e-6, rtol=0)

    def test_conditioning_fingerprint_changes_with_what_encode_depends_on(self, registry: Registry) -> None:
        base = self.make(registry).conditioning_fingerprint()
        assert isinstance(base, str) and base == self.make(registry).conditioning_fingerprint()
        assert self.make(registry, seed=self.seed + 1).conditioning_fingerprint() != base  # other encoder weights
        assert self.make(registry, offload_text_encoders=True, vae_decode_chunk=1).conditioning_fingerprint() == base
        changes = [*self.encode_option_changes, *([self.cfg_options] if self.cfg_options else [])]
        for change in changes:
            assert self.make(registry, **change).conditioning_fingerprint() != base, change

    def test_model_text_encoders_load_on_first_encode(self, registry: Registry, stock_dir: Path,
                                                      tmp_path: Path) -> None:
        """With `model:` the text encoders are left out of the pipeline until the first encode; the fingerprint
        reads their files, not their weights, and changes when a file does."""
        policy = self.make(registry, model=str(stock_dir), dtype="float32", **self.model_options)
        assert policy.text_encoder_modules() == {}
        fingerprint = policy.conditioning_fingerprint()
        assert policy.text_encoder_modules() == {}
        cond = policy.encode(list(self.prompts))
        encoders = policy.text_encoder_modules()
        assert encoders and all(not m.training and not any(p.requires_grad for p in m.parameters())
                                for m in encoders.values())
        expected = self.make(registry).encode(list(self.prompts))  # the same weights, built in memory
        assert cond.keys() == expected.keys() and all(torch.equal(cond[k], expected[k]) for k in cond)
        assert policy.conditioning_fingerprint() == fingerprint  # loading them changes nothing
        import shutil

        copy_dir = tmp_path / "copy"
        shutil.copytree(stock_dir, copy_dir)
        moved = self.make(registry, model=str(copy_dir), dtype="float32", **self.model_options)
        before = moved.conditioning_fingerprint()
        config = next(copy_dir.glob("text_encoder*/config.json"))
        config.write_text(config.read_text() + "\n")
        assert moved.conditioning_fingerprint() != before

    def test_cached_conditioning_never_loads_the_text_encoders(self, registry: Registry, stock_dir: Path,
                                                               tmp_path: Path) -> None:
        """A second policy over the same on-disk conditioning cache reads every prompt from it: no encode, no
        text encoder loaded, identical conditioning."""
        from flowfactory.train.conditioning import ConditioningCache

        options = dict(model=str(stock_dir), dtype="float32", **self.model_options)
        first = ConditioningCache(self.make(registry, **options), directory=tmp_path)
        expected = first(list(self.prompts))
        assert first.encode_calls == 1
        policy = self.make(registry, **options)
        cache = ConditioningCache(policy, directory=tmp_path)
        out = cache(list(self.prompts))
        assert cache.encode_calls == 0 and cache.disk_hits == len(set(self.prompts))
        assert policy.text_encoder_modules() == {}
        assert out.keys() == expected.keys() and all(torch.equal(out[k], expected[k]) for k in out)
