"""The training loop and what it needs: advantages, checkpoints, logging.

`run` is the entry point used by `ff run`; import is lazy so `import flowfactory.train` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowfactory.train.loop import RunSummary


def run(cfg: Any, options: dict[str, Any], *, output_dir: str | None = None, resume: bool = False,
        source: str = "<config>", show_progress: bool = True, registry: Any = None,
        resume_command: str | None = None) -> RunSummary:
    """Train `cfg` (a validated RunConfig with its component options). See `flowfactory.train.loop`;
    `resume_command` is the `ff run ... --resume` line messages name (the CLI passes the user's --set and --output)."""
    from flowfactory.train.loop import run as _run

    return _run(cfg, options, output_dir=output_dir, resume=resume, source=source, show_progress=show_progress,
                registry=registry, resume_command=resume_command)
