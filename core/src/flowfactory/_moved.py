"""Deprecated import paths kept for one release after their code moved out of core to another distribution.

Core never imports these aliases itself; they exist so third-party plugins written against the old paths keep
working (with a DeprecationWarning naming the new import) until their next release.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType


def moved(old: str, new: str, distribution: str) -> ModuleType:
    """Warn that module `old` is now `new` (in `distribution`) and return `new`, or raise an ImportError that says
    which package to install when `distribution` is not installed."""
    warnings.warn(f"{old} moved to {new} (package {distribution}); import {new} instead: the old path goes away in "
                  f"flowfactory 0.2", DeprecationWarning, stacklevel=3)
    top = new.split(".")[0]
    try:
        return importlib.import_module(new)
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == top:
            raise ImportError(f"{old} moved out of flowfactory's core to {new}: pip install {distribution}, then "
                              f"import {new}") from exc
        raise
