"""Per-process memory of a run before it is launched (`ff plan`), from the model's config alone.

A policy that can be planned registers `plan=` beside its build function: `plan(options, ctx) -> PolicyPlan`
names its modules (`Part`: trained, frozen text encoders/VAE, reference copy) with their parameters by dtype,
and the shapes the loop stores per rollout and per prompt. Everything else is accounted here, without a
model name: AdamW state, gradients, sharding, EMA, the rollout buffer and the conditioning cache. Nothing here
imports torch at module level; `plan_memory` builds the (weight-free) sampler and algorithm to read their
step count and `Requirements`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from flowfactory.errors import FlowFactoryError
from flowfactory.registry import BuildContext

DTYPE_BYTES: dict[str, int] = {
    "float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "complex64": 8, "complex128": 16,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}
CACHE_CAPACITY = 512  # prompts `flowfactory.train.conditioning.ConditioningCache` keeps by default
ADAM_STATES = 2  # exp_avg and exp_avg_sq, each in the parameter's dtype
STEP_BYTES = 4  # AdamW's float32 step counter, one per parameter tensor

Role = Literal["trained", "text encoder", "vae", "reference", "frozen"]


def dtype_name(dtype: Any) -> str:
    """'float32' for torch.float32 (or the string itself): the keys of `DTYPE_BYTES`."""
    return str(dtype).removeprefix("torch.")


def nbytes(counts: Mapping[str, int]) -> int:
    """Bytes of elements counted by dtype name."""
    try:
        return sum(DTYPE_BYTES[d] * n for d, n in counts.items())
    except KeyError as exc:
        raise FlowFactoryError(f"plan: unknown dtype {exc.args[0]!r}; known: {', '.join(DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class Part:
    """One module of a policy: its elements by dtype, split into what the optimizer updates and the rest.

    role: "trained" (the transformer(s) the loop wraps: DDP/FSDP), "text encoder", "vae", "reference" (a full
    finetune's frozen copy of the initial transformer) or "frozen" (anything else that stays on the device).
    trainable/frozen: dtype name -> elements; frozen counts frozen parameters and buffers.
    parameters: parameters only (no buffers), trainable included, for the parameter-count column.
    trainable_tensors: parameter tensors the optimizer updates (AdamW keeps a step counter for each).
    host: kept in CPU memory between uses (e.g. text encoders offloaded by the policy).
    """

    name: str
    role: Role
    label: str
    parameters: int
    trainable: Mapping[str, int] = field(default_factory=dict)
    frozen: Mapping[str, int] = field(default_factory=dict)
    trainable_tensors: int = 0
    host: bool = False

    @property
    def trainable_bytes(self) -> int:
        return nbytes(self.trainable)

    @property
    def frozen_bytes(self) -> int:
        return nbytes(self.frozen)

    @property
    def trainable_elements(self) -> int:
        return sum(self.trainable.values())



def count_module(module: Any, trainable: Callable[[str, Any], bool]) -> tuple[Counter[str], Counter[str], int, int]:
    """(trainable elements by dtype, frozen elements (parameters and buffers) by dtype, trainable tensors,
    parameters) of a torch module (real or on the meta device); `trainable(name, p)` says which parameters the
    optimizer updates."""
    train, frozen = Counter[str](), Counter[str]()
    tensors = params = 0
    for name, p in module.named_parameters():
        params += p.numel()
        if trainable(name, p):
            train[dtype_name(p.dtype)] += p.numel()
            tensors += 1
        else:
            frozen[dtype_name(p.dtype)] += p.numel()
    for b in module.buffers():
        frozen[dtype_name(b.dtype)] += b.numel()
    return train, frozen, tensors, params


def module_part(name: str, role: Role, module: Any, trainable: Callable[[str, Any], bool] = lambda n, p: False, *,
                host: bool = False) -> Part:
    """A `Part` counted from a torch module (meta or real); `host`: it stays in CPU memory between uses."""
    train, frozen, tensors, params = count_module(module, trainable)
    return Part(name, role, type(module).__name__, params, dict(train), dict(frozen), tensors, host)

@dataclass(frozen=True)
class PolicyPlan:
    """What only the policy knows: its parts and the per-sample shapes the loop keeps.

    latent_shape/latent_dtype: one rollout state as the sampler stores it (`Policy.noise`'s dtype).
    sample_shape: one decoded sample ([C, H, W] or [T, C, H, W]), float32.
    conditioning: key of `Policy.encode`'s dict -> (per-prompt shape, dtype name).
    """

    parts: tuple[Part, ...]
    latent_shape: tuple[int, ...]
    latent_dtype: str
    sample_shape: tuple[int, ...]
    conditioning: Mapping[str, tuple[tuple[int, ...], str]]
    notes: tuple[str, ...] = ()

    @property
    def latent_bytes(self) -> int:
        return math.prod(self.latent_shape) * DTYPE_BYTES[self.latent_dtype]

    @property
    def prompt_bytes(self) -> int:
        """Bytes of one prompt's conditioning."""
        return sum(math.prod(shape) * DTYPE_BYTES[d] for shape, d in self.conditioning.values())


@dataclass(frozen=True)
class Row:
    """One line of the plan: bytes per process, where they live, and how they were counted."""

    item: str
    bytes: int
    detail: str
    host: bool = False  # in CPU memory (fsdp cpu_offload), not on the accelerator


@dataclass(frozen=True)
class MemoryPlan:
    """The per-process memory of a run: rows, their totals, and the parts they came from."""

    policy: str
    processes: int
    strategy: str
    rows: tuple[Row, ...]
    parts: tuple[Part, ...]
    notes: tuple[str, ...]

    @property
    def device_total(self) -> int:
        return sum(r.bytes for r in self.rows if not r.host)

    @property
    def host_total(self) -> int:
        return sum(r.bytes for r in self.rows if r.host)

    def row(self, item: str) -> Row:
        """The row named `item` (KeyError naming the rows otherwise)."""
        for r in self.rows:
            if r.item == item:
                return r
        raise KeyError(f"no row {item!r}; rows: {[r.item for r in self.rows]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (`ff plan --json`)."""
        return {
            "policy": self.policy, "processes": self.processes, "strategy": self.strategy,
            "rows": [{"item": r.item, "bytes": r.bytes, "detail": r.detail, "host": r.host} for r in self.rows],
            "device_total": self.device_total, "host_total": self.host_total, "activations": "not estimated",
            "parts": [{"name": p.name, "role": p.role, "label": p.label, "parameters": p.parameters,
                       "trainable": p.trainable_elements} for p in self.parts],
            "notes": list(self.notes),
        }


def _shard(n: int, processes: int, sharded: bool) -> int:
    """Bytes one process holds of `n`: all of it, or an even 1/N share (FSDP) rounded up."""
    return -(-n // processes) if sharded else n


def count_prompts(cfg: Any, source: str) -> int:
    """Distinct prompts the run encodes (train set, plus the eval prompts used), capped by the cache size."""
    from flowfactory.config import config_dir
    from flowfactory.train.data import load_prompts

    base = config_dir(source)
    prompts = {p.key for p in load_prompts(cfg.data.train, base, "data.train")}
    t = cfg.train
    if cfg.data.eval is not None and t.eval_every > 0:
        prompts |= {p.key for p in load_prompts(cfg.data.eval, base, "data.eval")[:t.eval_prompts]}
    return min(len(prompts), CACHE_CAPACITY)


def policy_plan(cfg: Any, options: Mapping[str, Any], registry: Any) -> tuple[PolicyPlan, Any]:
    """The policy's `PolicyPlan` and the algorithm's `Requirements`, as the loop would build them."""
    spec = registry.get("policy", cfg.policy.name)
    if spec.plan is None:
        raise FlowFactoryError(
            f"policy {cfg.policy.name!r} ({spec.package} {spec.version}) cannot be planned: it registers no `plan=` "
            f"function. Its package must pass `register(..., plan=...)` (docs/memory.md).")
    ctx = BuildContext(seed=cfg.seed)
    algorithm = registry.get("optimizer", cfg.optimizer.name).create(options["optimizer"], ctx)
    need = algorithm.requirements
    plan = spec.plan(options["policy"], BuildContext(seed=cfg.seed, reference=need.reference))
    return plan, need


def plan_memory(cfg: Any, options: Mapping[str, Any], registry: Any, processes: int = 1,
                source: str = "<config>") -> MemoryPlan:
    """Per-process bytes of every long-lived tensor of the run `cfg` over `processes` processes.

    Exact for what the loop allocates itself (parameters, AdamW state, gradients, EMA, rollouts, conditioning);
    FSDP shares are an even 1/N (FSDP pads each tensor's first dimension to a multiple of N: a few rows more).
    Activations and allocator overhead are not estimated."""
    if processes < 1:
        raise FlowFactoryError(f"--processes must be at least 1, got {processes}")
    t, par = cfg.train, cfg.train.parallel
    from flowfactory.config import split_problems

    problems = split_problems(cfg, processes)
    if problems:
        raise FlowFactoryError(f"{source}: {problems[0][0]}: {problems[0][1]}")
    plan, need = policy_plan(cfg, options, registry)
    sampler = registry.get("sampler", cfg.sampler.name).create(options["sampler"], BuildContext(seed=cfg.seed))
    steps = int(sampler.steps)

    fsdp = par.strategy == "fsdp" and processes > 1
    offload = par.strategy == "fsdp" and par.cpu_offload
    trained = [p for p in plan.parts if p.role == "trained"]
    share = f" / {processes} (fsdp shard)" if fsdp else ""

    def sharded(n: int) -> int:
        return _shard(n, processes, fsdp)

    trainable = sum(p.trainable_bytes for p in trained)
    tensors = sum(p.trainable_tensors for p in trained)
    elements = sum(p.trainable_elements for p in trained)
    dtypes = ", ".join(sorted({d for p in trained for d in p.trainable})) or "-"
    rows = [
        Row("trainable parameters", sharded(trainable), f"{elements:,} elements ({dtypes}){share}", offload),
        Row("gradients", sharded(trainable), f"one per trainable element, in its dtype{share}", offload),
        Row("optimizer state (AdamW)", ADAM_STATES * sharded(trainable) + STEP_BYTES * tensors,
            f"exp_avg + exp_avg_sq in the parameters' dtype{share}, + a 4-byte step for each of {tensors:,} tensors",
            offload),
    ]
    if par.strategy == "ddp" and processes > 1:
        rows.append(Row("ddp gradient buckets", trainable, "DDP's all-reduce buckets: a second copy of the gradients"))
    if t.ema.enabled:
        rows.append(Row("EMA shadow", sharded(4 * elements), f"float32 copy of the trainable parameters{share}",
                        offload))
    frozen_trained = sum(p.frozen_bytes for p in trained)
    if frozen_trained:
        rows.append(Row("frozen transformer weights", sharded(frozen_trained),
                        _labels(trained, frozen=True) + share, offload))
    for role, item in (("reference", "reference copy"), ("text encoder", "text encoders"), ("vae", "VAE"),
                       ("frozen", "other frozen modules")):
        for host in (False, True):
            parts = [p for p in plan.parts if p.role == role and p.host == host]
            if not parts:
                continue
            size = sum(p.frozen_bytes + p.trainable_bytes for p in parts)
            if role == "reference":  # train/parallel.py shards the frozen copy like the trained module
                rows.append(Row(item, sharded(size), _labels(parts) + share, host or offload))
            else:
                rows.append(Row(item, size, _labels(parts), host))
    if par.strategy == "fsdp" and not par.reshard_after_forward and fsdp:
        gathered = sum(p.parameters for p in trained)
        size = DTYPE_BYTES[par.param_dtype] if par.param_dtype else None
        full = gathered * size if size else sum(p.trainable_bytes + p.frozen_bytes for p in trained)
        rows.append(Row("gathered weights (fsdp)", full, "reshard_after_forward: false keeps every block's full "
                        f"weights{' in ' + par.param_dtype if par.param_dtype else ''} from forward to backward"))

    prompts = count_prompts(cfg, source)
    per_prompt = plan.prompt_bytes
    n_local = t.prompts_per_epoch * t.group_size // processes
    keep_steps = need.keep == "steps"
    states = steps + 2 if keep_steps else 1  # x_0..x_S stacked, plus `final` (its own tensor)
    logp = 4 * steps if keep_steps else 0
    schedule = 4 * (steps + 1) + steps  # sigmas float32 [S+1] and the stochastic mask bool [S], once per batch
    kept = (f"{states} states of {list(plan.latent_shape)} {plan.latent_dtype} + {steps} float32 log-probs"
            if keep_steps else f"final state {list(plan.latent_shape)} {plan.latent_dtype}")
    rows += [
        Row("conditioning cache", prompts * per_prompt,
            f"{prompts} prompts x {human_bytes(per_prompt)} ({_shapes(plan.conditioning)})"),
        Row("epoch conditioning", n_local * per_prompt, f"{n_local} rollouts' rows gathered from the cache"),
        Row("rollout buffer", n_local * (states * plan.latent_bytes + logp) + schedule,
            f"{n_local} rollouts x ({kept})"),
        Row("decoded samples", n_local * math.prod(plan.sample_shape) * 4,
            f"{n_local} x {list(plan.sample_shape)} float32"),
    ]
    return MemoryPlan(cfg.policy.name, processes, par.strategy, tuple(rows), plan.parts, plan.notes)


def _labels(parts: list[Part], frozen: bool = False) -> str:
    """'transformer: FluxTransformer2DModel 11.9B bfloat16, ...' for a row's detail."""
    out = []
    for p in parts:
        counts = dict(p.frozen) if frozen else {
            d: p.frozen.get(d, 0) + p.trainable.get(d, 0) for d in {*p.frozen, *p.trainable}}
        dtypes = "/".join(sorted(d for d, n in counts.items() if n))
        n = sum(counts.values())
        out.append(f"{p.name}: {p.label} {_count(n)} {dtypes}")
    return ", ".join(out)


def _shapes(cond: Mapping[str, tuple[tuple[int, ...], str]]) -> str:
    return ", ".join(f"{k} {list(s)} {d}" for k, (s, d) in cond.items())


def _count(n: int) -> str:
    """12.0B, 7.1M, 3.2K elements."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    """Bytes in binary units: 22.17 GiB, 3.0 MiB, 512 B."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"

