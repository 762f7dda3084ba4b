"""The training loop and what it needs: advantages, checkpoints, logging.

`run` is the entry point used by `ff run`; import is lazy so `import flowfactory.train` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowfactory.train.loop import RunSummary


def run(cfg: Any, options: dict[str, Any], *, output_dir: str | None = None, resume: bool = False,
        source: str = "<config>", show_progress: bool = True, registry: Any = None) -> RunSummary:
    """Train `cfg` (a validated RunConfig with its component options). See `flowfactory.train.loop`."""
    from flowfactory.train.loop import run as _run

    return _run(cfg, options, output_dir=output_dir, resume=resume, source=source, show_progress=show_progress,
                registry=registry)
