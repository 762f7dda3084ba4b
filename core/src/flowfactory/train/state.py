"""Training state by name: the trained parameters keyed by their module path (FQN), and nested state dicts
flattened into named tensors plus a JSON tree, so a checkpoint never depends on the order of a parameter
list and never needs pickle.

Parameters are looked up from the policy each time (`named_trainable`), never cached: sharding (FSDP2)
replaces a module's parameters, and a cached list would point at the old ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flowfactory.errors import FlowFactoryError

SEP = "/"  # joins nested keys; FQNs hold dots, so the separator is not a dot
TENSOR = "__tensor__"  # a JSON leaf standing for a tensor stored under this name


def raw_module(module: Any) -> nn.Module:
    """The module under a DistributedDataParallel (or Accelerate) wrapper, else the module itself."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(module, DistributedDataParallel):
        module = module.module
    return module


def named_trainable(policy: Any) -> dict[str, torch.Tensor]:
    """The policy's trainable parameters keyed by their name in `policy.module` (in the policy's order)."""
    names = {id(p): n for n, p in raw_module(policy.module).named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for p in policy.trainable_parameters():
        name = names.get(id(p))
        if name is None:
            raise FlowFactoryError(
                f"{type(policy).__name__}.trainable_parameters() returned a parameter of shape {tuple(p.shape)} "
                f"that is not a parameter of policy.module; a policy's trained weights must live in its `module`, "
                f"so they can be named, sharded and checkpointed")
        out[name] = p
    return out


def flatten(tree: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON tree with each tensor replaced by {"__tensor__": name}, {name: tensor}).

    Dict keys must be strings (ints are kept as their string), values JSON types, tensors, lists or tuples
    of them. Anything else (an arbitrary object) is refused: a checkpoint holds only data."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node
            return {TENSOR: path}
        if isinstance(node, dict):
            return {str(k): walk(v, f"{path}{SEP}{k}" if path else str(k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}{SEP}{i}" if path else str(i)) for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise FlowFactoryError(
            f"training state at {path!r} holds a {type(node).__name__}; checkpoints hold only tensors, numbers, "
            f"strings, lists and dicts (return those from state_dict())")

    return walk(tree, prefix), tensors


def unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `flatten`: tensor leaves filled from `tensors`."""
    if isinstance(tree, dict):
        if set(tree) == {TENSOR}:
            return tensors[tree[TENSOR]]
        return {k: unflatten(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten(v, tensors) for v in tree]
    return tree


def optimizer_state(optimizer: torch.optim.Optimizer, named: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The optimizer's per-parameter state keyed by parameter name (AdamW: step, exp_avg, exp_avg_sq)."""
    return {name: dict(optimizer.state[p]) for name, p in named.items() if p in optimizer.state}


def init_optimizer_state(optimizer: torch.optim.Optimizer, named: dict[str, torch.Tensor],
                         shapes: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]) -> None:
    """Create empty per-parameter state of the saved shapes, to be filled in place by a checkpoint load.

    A state tensor shaped like its parameter is made with `zeros_like` so that it is sharded like it."""
    for name, entries in shapes.items():
        p = named.get(name)
        if p is None:
            raise FlowFactoryError(f"the checkpoint has optimizer state for parameter {name!r}, which the policy "
                                   f"does not train with this config")
        state = optimizer.state[p]
        for key, (shape, dtype) in entries.items():
            if key in state and tuple(state[key].shape) == shape:
                continue
            if shape == tuple(p.shape):
                state[key] = torch.zeros_like(p, dtype=dtype)
            else:
                device = p.device if not _is_dtensor(p) else p.to_local().device
                state[key] = torch.zeros(shape, dtype=dtype, device="cpu" if key == "step" else device)


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)
