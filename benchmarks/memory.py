"""Memory a full finetune holds with and without the frozen reference copy of its transformer.

A run whose algorithm never calls `policy.reference()` (no KL term: `Requirements.reference` False) builds the
policy with `BuildContext(reference=False)`, and a full finetune then keeps no second transformer. This script
builds each policy's tiny preset both ways and prints the bytes of every distinct tensor the policy's modules
hold (trained transformer, frozen copy), and the ratio. It also counts FLUX.1-dev's transformer parameters on
the meta device (no weights needed) to say what the copy costs at real size.

    python benchmarks/memory.py
"""

from __future__ import annotations

import dataclasses

import torch

from flowfactory.plugins import load
from flowfactory.policies import quiet_transformers
from flowfactory.registry import BuildContext

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


def main() -> None:
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


if __name__ == "__main__":
    main()
