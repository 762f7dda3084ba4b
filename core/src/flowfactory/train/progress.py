"""A rich progress bar over epochs, showing the latest reward and loss."""

from __future__ import annotations

from typing import Any


class Progress:
    def __init__(self, name: str, start: int, total: int, enabled: bool = True):
        self.bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
        self.task = self.bar.add_task(f"{name}: epoch", total=total, completed=start, info="")
        self.bar.start()

    def update(self, epoch: int, row: dict[str, Any]) -> None:
        if self.bar is None:
            return
        info = f"reward {row['reward/mean']:.4f}"
        if "loss" in row:
            info += f"  loss {row['loss']:+.2e}"
        if "eval/reward/mean" in row:
            info += f"  eval {row['eval/reward/mean']:.4f}"
        self.bar.update(self.task, completed=epoch, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
