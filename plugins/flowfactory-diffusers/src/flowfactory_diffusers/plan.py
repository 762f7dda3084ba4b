"""The diffusers half of a policy's memory plan (`ff plan`): the pipeline's modules on the meta device, built
from their config files alone (a hub id downloads only model_index.json and each component's config.json),
given the same dtypes and LoRA adapters a real build gives them, then counted by dtype.

Imports torch, diffusers and peft at its top: import it from a policy's `plan` function only.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowfactory.errors import FlowFactoryError
from flowfactory.plan import Part, Role, count_module, module_part  # noqa: F401  (re-exported: plugins import them here)
from flowfactory.registry import BuildContext
from flowfactory_diffusers.policy import HUB_ID, TRANSFORMERS, add_lora, cast_parts, resolve_dtype


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence diffusers' notes about ignored config keys while configs are read."""
    from diffusers.utils import logging as d_logging

    previous = d_logging.get_verbosity()
    d_logging.set_verbosity_error()
    try:
        yield
    finally:
        d_logging.set_verbosity(previous)


def meta_modules(options: Any, ctx: BuildContext, pipeline_cls: type, tiny: Callable[[], Any], *,
                 policy: str) -> tuple[dict[str, nn.Module], bool]:
    """The pipeline's torch modules on the meta device in the dtypes `load_or_build` gives them, and whether
    they are the tiny preset's. No weights are read or allocated."""
    from accelerate import init_empty_weights

    is_tiny = options.preset == "tiny"
    with init_empty_weights(include_buffers=True), _quiet():
        modules = ({n: m for n, m in tiny().components.items() if isinstance(m, nn.Module)} if is_tiny
                   else _from_configs(pipeline_cls, options.model, options.revision, policy=policy))
    dtype = resolve_dtype(options.dtype, ctx, tiny=is_tiny)
    transformer_dtype = dtype if options.lora is not None else torch.float32
    cast_parts([(m, transformer_dtype if n in TRANSFORMERS else dtype) for n, m in modules.items()])
    return modules, is_tiny


def _from_configs(pipeline_cls: type, model: str, revision: str | None, *, policy: str) -> dict[str, nn.Module]:
    """Each torch component of model_index.json built from its own config (inside `init_empty_weights`)."""
    path = Path(os.path.expanduser(model))
    local = path.exists() or not HUB_ID.match(model)
    if local and not (path / "model_index.json").is_file():
        raise FlowFactoryError(
            f"{policy} policy option model={model!r}: no model_index.json there; give a hub id or a "
            f"{pipeline_cls.__name__} folder (only model_index.json and each component's config.json are read).")
    where = str(path) if local else model
    try:
        index = pipeline_cls.load_config(where, revision=revision)
        modules: dict[str, nn.Module] = {}
        for name, value in index.items():
            if name.startswith("_") or not isinstance(value, (list, tuple)) or value[0] is None:
                continue
            cls = getattr(importlib.import_module(value[0]), value[1])
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                continue  # tokenizers, schedulers, processors
            if value[0] == "diffusers":
                modules[name] = cls.from_config(cls.load_config(where, subfolder=name, revision=revision))
            else:
                config = cls.config_class.from_pretrained(where, subfolder=name, revision=revision)
                modules[name] = cls._from_config(config)
    except OSError as exc:
        raise FlowFactoryError(
            f"{policy} policy option model={model!r}: a config file could not be read: {exc}. `ff plan` needs "
            f"model_index.json and <component>/config.json (no weights); check the id, network and login, or give a "
            f"local folder.") from exc
    return modules


def frozen_role(name: str) -> Role:
    """The role of a frozen pipeline component from its conventional name."""
    if name.startswith("text_encoder"):
        return "text encoder"
    return "vae" if name == "vae" else "frozen"


def plan_parts(modules: Mapping[str, nn.Module], options: Any, ctx: BuildContext, policy_cls: type) -> tuple[Part, ...]:
    """The policy's parts as `DiffusersPolicyBase._setup_training` leaves them: LoRA adapters (float32) on each
    trained transformer or, for a full finetune, every parameter trainable but the policy's dead modules and a
    frozen reference copy when the run uses the reference view; the other modules frozen (text encoders in host
    memory under `offload_text_encoders`)."""
    probe = policy_cls.__new__(policy_cls)  # `_dead_modules` reads only the transformer it is given
    parts: list[Part] = []
    for name in TRANSFORMERS:
        module = modules.get(name)
        if module is None:
            continue
        dead = probe._dead_modules(module)
        if options.lora is not None:
            add_lora(module, options.lora, ctx.seed, policy=policy_cls.name, hint=policy_cls.lora_target_hint,
                     exclude=dead, optional=policy_cls.lora_optional_targets)
            parts.append(module_part(name, "trained", module, lambda n, p: "lora_" in n))
            continue
        module.requires_grad_(True)
        for d in dead:
            module.get_submodule(d).requires_grad_(False)
        parts.append(module_part(name, "trained", module, lambda n, p: p.requires_grad))
        if ctx.reference:
            parts.append(module_part(f"{name} (reference copy)", "reference", module))
    offload = bool(getattr(options, "offload_text_encoders", False))  # the policy moves them in only to encode
    parts += [module_part(n, frozen_role(n), m, host=offload and frozen_role(n) == "text encoder")
              for n, m in modules.items() if n not in TRANSFORMERS]
    return tuple(parts)
