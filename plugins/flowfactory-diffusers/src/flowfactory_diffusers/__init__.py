"""flowfactory-diffusers: what diffusers-based policy plugins share, kept out of flowfactory's model-agnostic core.

A library, not a plugin: it registers no component (it has no entry point). Its modules:

- `flowfactory_diffusers.options`: the option models (pydantic only, safe for entry-point modules);
- `flowfactory_diffusers.policy`: `DiffusersPolicyBase` and the loading, LoRA, dtype and saving helpers (imports
  torch, diffusers and peft: import it from a build function only);
- `flowfactory_diffusers.plan`: the diffusers half of `ff plan` (meta-device modules from config files);
- `flowfactory_diffusers.testing`: `DiffusersPolicyContract`, the pytest suite against stock diffusers;
- `flowfactory_diffusers.tokenizers`: in-memory tokenizers for tiny test models.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings while diffusers pipelines are imported (it warns that torchvision is
    missing, for image processors text-to-image policies never use); keeps them out of a run's output."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
