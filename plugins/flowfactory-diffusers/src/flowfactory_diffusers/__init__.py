"""Shared building blocks for diffusers-based policy plugins.

`flowfactory.policies.options` is pydantic-only (safe for entry-point modules); `flowfactory.policies.diffusers`
imports torch, diffusers and peft, so only a plugin's build function should import it.
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
