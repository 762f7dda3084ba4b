"""Memory a full finetune holds with and without the frozen reference copy of its transformer.

A run whose algorithm never calls `policy.reference()` (no KL term: `Requirements.reference` False) builds the
policy with `BuildContext(reference=False)`, and a full finetune then keeps no second transformer. This script
builds each policy's tiny preset both ways and prints the bytes of every distinct tensor the policy's modules
hold (trained transformer, frozen copy), and the ratio. It also counts FLUX.1-dev's transformer parameters on
the meta device (no weights needed) to say what the copy costs at real size.

It then measures what FSDP2 sharding saves: the tiny FLUX preset as a full finetune, trained parameters and
AdamW state (after a real optimizer step) counted as each process holds them, on 1 process and sharded over 2
CPU processes (gloo) by the loop's own `flowfactory.train.parallel.shard`, and prints the per-process ratio.

    python benchmarks/memory.py              # everything
    python benchmarks/memory.py --fsdp-only  # the sharding measurement alone
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import tempfile

import torch

from flowfactory.plugins import load
from flowfactory.registry import BuildContext
from flowfactory_diffusers import quiet_transformers

POLICIES = ("flux", "sd3", "qwen-image", "wan")

# FLUX.1-dev's transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def held_bytes(policy) -> int:
    """Bytes of every distinct tensor in the trained module and the frozen reference copy."""
    seen: dict[int, int] = {}
    for module in (policy.module, getattr(policy, "_frozen_copy", None)):
        if module is None:
            continue
        for t in [*module.parameters(), *module.buffers()]:
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this process holds of `t` (its shard when `t` is a DTensor)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def trained_and_optimizer_bytes(policy, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the trained parameters and of every AdamW state tensor, as this process holds them."""
    params = policy.trainable_parameters()
    total = sum(local_bytes(p) for p in params)
    for p in params:
        total += sum(local_bytes(v) for v in optimizer.state[p].values() if isinstance(v, torch.Tensor))
    return total


def _fsdp_worker(rank: int, world: int, port: int, result: str) -> None:
    """One process: tiny FLUX full finetune, sharded over `world` processes when world > 1, one AdamW step."""
    import torch.distributed as dist

    from flowfactory.config import ParallelConfig
    from flowfactory.train import parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    policy = load(strict=True).registry.get("policy", "flux").create({"preset": "tiny"},
                                                                       BuildContext(seed=0, reference=False))
    if world > 1:
        parallel.shard(policy, ParallelConfig(strategy="fsdp"), torch.device("cpu"), world)
    params = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW allocates its state as it really does
    held = torch.tensor([trained_and_optimizer_bytes(policy, optimizer)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(held, op=dist.ReduceOp.MAX)  # the fullest process
    if rank == 0:
        with open(result, "w") as f:
            f.write(str(int(held.item())))
    if world > 1:
        dist.destroy_process_group()


def fsdp_bytes(world: int) -> int:
    """Per-process trained + optimizer bytes of the tiny FLUX full finetune over `world` processes."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        result = os.path.join(d, "bytes")
        mp.spawn(_fsdp_worker, args=(world, port, result), nprocs=world, join=True)
        with open(result) as f:
            return int(f.read())


def fsdp_section() -> None:
    one, two = fsdp_bytes(1), fsdp_bytes(2)
    print("tiny FLUX full finetune: trained parameters + AdamW state held per process")
    print(f"1 process          {one / 2**20:8.2f} MB")
    print(f"fsdp2, 2 processes {two / 2**20:8.2f} MB")
    print(f"fsdp2 2-process ratio {two / one:.3f}")


def main() -> None:
    if "--fsdp-only" in sys.argv:
        fsdp_section()
        return
    registry = load(strict=True).registry
    print("full finetune of each tiny preset (float32 master weights): bytes held by the transformer(s)")
    print(f"{'policy':<12}{'with reference':>16}{'without':>12}{'ratio':>8}")
    for name in POLICIES:
        spec = registry.get("policy", name)
        ctx = BuildContext(seed=0)
        with_ref = held_bytes(spec.create({"preset": "tiny"}, ctx))
        without = held_bytes(spec.create({"preset": "tiny"}, dataclasses.replace(ctx, reference=False)))
        print(f"{name:<12}{with_ref / 2**20:>13.1f} MB{without / 2**20:>9.1f} MB{without / with_ref:>8.3f}")

    with quiet_transformers():
        from diffusers import FluxTransformer2DModel
    with torch.device("meta"):
        flux_dev = FluxTransformer2DModel(**FLUX_DEV)
    n = sum(p.numel() for p in flux_dev.parameters())
    print(f"\nFLUX.1-dev transformer: {n / 1e9:.2f}B parameters; its frozen copy is {4 * n / 2**30:.1f} GiB in "
          f"float32 ({2 * n / 2**30:.1f} GiB in bf16), held per process by a full finetune with a reference")
    print()
    fsdp_section()


if __name__ == "__main__":
    main()
