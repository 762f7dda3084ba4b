"""Data parallelism over processes: DDP (Accelerate wraps the trained module) or FSDP2 (`fully_shard`).

FSDP2 is applied the way torchtitan applies it: `fully_shard` on every module of the policy's
`fsdp_block_classes`, innermost first, then on the root, for the trained module and for any frozen copy the
policy keeps (a full finetune's reference), so no process holds a whole copy of either. It needs only an
initialised process group, so the same code runs on GPUs (NCCL) and on CPU processes (gloo) in the tests.
Parameters are resharded after every forward that runs without grad (rollouts, eval, reference and old-policy
passes), so code that swaps weights in place between forwards always sees the shards.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from flowfactory.errors import FlowFactoryError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def frozen_copies(policy: Any) -> list[nn.Module]:
    """The frozen copies of trained networks a policy keeps (its optional `frozen_copies()`), to shard too."""
    get = getattr(policy, "frozen_copies", None)
    return [m for m in (get() if callable(get) else []) if m is not None]


def fsdp_modules(root: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in root.modules() if isinstance(m, FSDPModule)]


def _reshard_without_grad(module: nn.Module, inputs: Any, output: Any) -> None:
    if not torch.is_grad_enabled():
        module.reshard()


def shard(policy: Any, options: Any, device: torch.device, world: int) -> int:
    """Apply FSDP2 to the policy's trained module and frozen copies; returns the number of sharded blocks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    classes = tuple(getattr(policy, "fsdp_block_classes", ()) or ())
    if not classes:
        raise FlowFactoryError(
            f"train.parallel.strategy: fsdp needs the policy to declare `fsdp_block_classes` (the transformer block "
            f"classes to shard), and {type(policy).__name__} declares none; use strategy: ddp")
    mesh = init_device_mesh(device.type, (world,))
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": options.reshard_after_forward,
                              "mp_policy": MixedPrecisionPolicy(
                                  param_dtype=DTYPES[options.param_dtype] if options.param_dtype else None,
                                  reduce_dtype=DTYPES[options.reduce_dtype])}
    if options.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    # diffusers blocks return views of their output (FLUX's single blocks split text and image tokens by
    # slicing); nothing downstream writes into them in place, and the 2-process tests check that sharded
    # gradients equal one process's, so FSDP2's warning about views is only noise in every run's output
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    count = 0
    for root in [policy.module, *frozen_copies(policy)]:
        blocks = [m for m in root.modules() if isinstance(m, classes) and m is not root]
        for block in reversed(blocks):  # innermost first, as modules() lists parents before children
            fully_shard(block, **kwargs)
        fully_shard(root, **kwargs)
        count += len(blocks)
        for m in fsdp_modules(root):
            m.register_forward_hook(_reshard_without_grad)
    return count


def reshard(module: nn.Module) -> None:
    """Free every gathered parameter of a sharded module (a no-op when it is already resharded or unsharded)."""
    for m in fsdp_modules(module):
        m.reshard()


@contextmanager
def no_sync(module: nn.Module, fsdp: bool, accelerator: Any) -> Iterator[None]:
    """Skip the gradient reduction of this backward (accumulate locally); the last micro-batch syncs."""
    if not fsdp:
        with accelerator.no_sync(module):
            yield
        return
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def sync_context(module: nn.Module, fsdp: bool, accelerator: Any, last: bool) -> Any:
    return nullcontext() if last else no_sync(module, fsdp, accelerator)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, fsdp: bool, accelerator: Any) -> float:
    """Clip the global gradient norm (over every process's shards with FSDP); returns the norm before clipping."""
    if not fsdp:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


@contextmanager
def full_weights(modules: list[nn.Module], main: bool) -> Iterator[None]:
    """Inside, on the main process, every sharded parameter of `modules` is a whole tensor on the CPU (so
    `policy.save` writes complete diffusers/peft files); the shards come back after. Every process must
    enter it: gathering is collective. Other processes keep their shards."""
    from torch.distributed.tensor import DTensor

    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for root in modules:
            reshard(root)
            for owner in root.modules():
                for name, p in list(owner._parameters.items()):
                    if isinstance(p, DTensor):
                        with torch.no_grad():
                            full = p.full_tensor()
                        if main:
                            owner._parameters[name] = nn.Parameter(full.detach().cpu(), requires_grad=p.requires_grad)
                            swapped.append((owner, name, p))
                        del full
        yield
    finally:
        for owner, name, p in swapped:
            owner._parameters[name] = p
