"""What a run leaves to look at: metrics.jsonl, tensorboard, Weights & Biases, PNG sample grids with captions,
and curves.png (the reward curves, train and eval, against epochs).

Nothing here imports torch or matplotlib at import time: `ff plot` reads metrics and draws curves without
torch, and `ff` starts without matplotlib."""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowfactory.errors import FlowFactoryError
from flowfactory.train.runfolder import write_error

if TYPE_CHECKING:
    import torch

    from flowfactory.config import WandbConfig

CURVES = "curves.png"


class MetricsLog:
    """One JSON object per epoch in metrics.jsonl, mirrored to tensorboard when available and enabled, and to
    Weights & Biases when `wandb.enabled` (with the run's `config` and the epoch's sample grids). curves.png is
    redrawn after every row with eval metrics and at `close()`."""

    def __init__(self, out: Path, tensorboard: bool, resume_epoch: int | None, *,
                 wandb: WandbConfig | None = None, config: dict[str, Any] | None = None):
        self.out = out
        self.path = out / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            keep = [r for r in read_metrics(self.path)
                    if resume_epoch is not None and r.get("epoch", 0) <= resume_epoch]
            self.rows = keep
            tmp = self.path.with_name(self.path.name + ".tmp")
            try:  # replaced whole, so a crash now leaves the old rows or the new ones, never a part
                tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
                os.replace(tmp, self.path)
            except OSError as exc:
                raise write_error(exc, self.path) from exc
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                self.writer = None
        self.wandb = _start_wandb(out, wandb, config or {}) if wandb is not None and wandb.enabled else None
        self.plot_note = False  # said once that matplotlib is missing

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as exc:  # a torn row is dropped on --resume (`read_metrics`)
            raise write_error(exc, self.path) from exc
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()
        if self.wandb is not None:
            self._log_wandb(row)
        if any(k.startswith("eval/") for k in row):
            self.write_curves()

    def _log_wandb(self, row: dict[str, Any]) -> None:
        """The row at step = its epoch, with the epoch's sample grids (samples/{train,eval}-EPOCH.png) as images. A
        resumed run replays epochs W&B already has at the same steps; W&B drops those (same values: a resumed run
        equals the uninterrupted one)."""
        import wandb

        epoch = int(row["epoch"])
        data: dict[str, Any] = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        for kind in ("train", "eval"):
            grid = self.out / "samples" / f"{kind}-{epoch:06d}.png"
            if grid.is_file():
                data[f"samples/{kind}"] = wandb.Image(str(grid), caption=f"{kind} samples, epoch {epoch}")
        self.wandb.log(data, step=epoch)

    def write_curves(self) -> None:
        """curves.png from the rows so far (nothing without matplotlib, said once on stderr)."""
        if not self.rows:
            return
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            if not self.plot_note:
                print("flowfactory: matplotlib is not installed, so no curves.png is drawn (pip install "
                      "'flowfactory[plot]')", file=sys.stderr)
                self.plot_note = True
            return
        try:
            save_figure(draw_curves(reward_panels({"": self.rows}), title=self.out.name), self.out / CURVES)
        except OSError as exc:  # a full disk stops the run as any other write does
            raise write_error(exc, self.out / CURVES) from exc
        except Exception as exc:  # a plotting bug must not stop a training run: say so and go on
            print(f"flowfactory: could not draw {self.out / CURVES}: {type(exc).__name__}: {exc}", file=sys.stderr)

    def close(self) -> None:
        """Closes tensorboard and W&B and draws the final curves.png. Called on the way out of a failed run too, so
        a failure here is a note on stderr, never an error that would hide the run's own."""
        if self.writer is not None:
            self.writer.close()
        try:
            self.write_curves()
        except Exception as exc:  # a note, not an error: the run may be failing already
            print(f"flowfactory: could not draw {self.out / CURVES}: {exc}", file=sys.stderr)
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _start_wandb(out: Path, cfg: WandbConfig, config: dict[str, Any]) -> Any:
    """A W&B run for this run folder, its config logged. Its id is kept in <out>/wandb.json, so `--resume` continues
    the same W&B run. W&B's files go to $WANDB_DIR when set, else into the run folder (<out>/wandb/)."""
    try:
        import wandb
    except ImportError as exc:
        raise FlowFactoryError("train.wandb.enabled: wandb is not installed; `pip install 'flowfactory[wandb]'`, or "
                               "set train.wandb.enabled: false") from exc
    id_file = out / "wandb.json"
    saved = json.loads(id_file.read_text()) if id_file.is_file() else {}
    run_id = saved.get("id") or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    try:
        run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, tags=list(cfg.tags) or None,
                         name=str(config.get("name") or out.name), id=run_id, resume="allow", config=config,
                         dir=os.environ.get("WANDB_DIR") or str(out), settings=wandb.Settings(console="off"))
    except Exception as exc:  # wandb raises its own types (no login, no network, ...)
        raise FlowFactoryError(
            f"train.wandb: wandb.init failed: {type(exc).__name__}: {exc}. Log in with `wandb login`, or set "
            f"train.wandb.mode: offline (upload later with `wandb sync`)") from exc
    try:
        id_file.write_text(json.dumps({"id": run_id, "project": cfg.project, "entity": cfg.entity}) + "\n")
    except OSError as exc:
        raise write_error(exc, id_file) from exc
    return run


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. A last line that is not a JSON object was cut short by a crash while it was
    written: it is dropped, with a message on stderr. Any other bad line is an error naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise FlowFactoryError(f"cannot read {path}: {exc.strerror}") from exc
    numbered = [(i, ln) for i, ln in enumerate(lines, 1) if ln.strip()]
    rows = []
    for k, (i, ln) in enumerate(numbered):
        try:
            row = json.loads(ln)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as exc:
            if k == len(numbered) - 1:
                print(f"flowfactory: {path}: dropped its last line (line {i}), cut short by a crash while it was "
                      f"written: {ln[:60]!r}{'...' if len(ln) > 60 else ''}", file=sys.stderr)
                break
            raise FlowFactoryError(
                f"{path}:{i}: not a metrics row ({exc}); only a torn last line is dropped on its own. Repair or "
                f"delete line {i}, then --resume again.") from exc
        rows.append(row)
    return rows


def save_grid(images: torch.Tensor, captions: list[str], path: Path, columns: int = 4, cell: int = 128,
              fps: int = 8) -> None:
    """A PNG grid of images [N, C, H, W] with captions. Videos [N, T, C, H, W] give a PNG with up to 4 evenly
    spaced frames side by side per sample, and beside it an animated GIF (same name, .gif) of the whole
    videos at `fps`, one grid per frame."""
    import torch
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if images.ndim == 5:  # videos
        t = images.shape[1]
        idx = torch.linspace(0, t - 1, min(t, 4)).round().long()
        _grid(torch.cat(list(images[:, idx].unbind(1)), dim=3), captions, columns, cell).save(path)
        frames = [_grid(images[:, i], captions, columns, cell) for i in range(t)]
        frames = [f.convert("P", palette=Image.ADAPTIVE) for f in frames]
        frames[0].save(path.with_suffix(".gif"), save_all=True, append_images=frames[1:],
                       duration=max(1, round(1000 / fps)), loop=0)
        return
    _grid(images, captions, columns, cell).save(path)


def _grid(images: torch.Tensor, captions: list[str], columns: int, cell: int) -> Any:
    """images [N, C, H, W] in [0, 1] as one captioned PIL image, `columns` per row, scaled up to ~`cell` px."""
    import torch
    from PIL import Image, ImageDraw, ImageFont

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    n = len(arr)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    h, w = arr.shape[1], arr.shape[2]
    scale = max(1, cell // max(h, 1))
    cw, ch = w * scale, h * scale
    cap_h = 28
    grid = Image.new("RGB", (cols * cw, rows * (ch + cap_h)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, a in enumerate(arr):
        img = Image.fromarray(a if a.shape[2] != 1 else a[:, :, 0]).convert("RGB").resize((cw, ch), Image.NEAREST)
        x, y = (i % cols) * cw, (i // cols) * (ch + cap_h)
        grid.paste(img, (x, y))
        text = captions[i] if i < len(captions) else ""
        max_chars = max(8, cw // 6)
        lines = [text[j:j + max_chars] for j in range(0, min(len(text), 2 * max_chars), max_chars)]
        for k, ln in enumerate(lines):
            draw.text((x + 2, y + ch + 2 + 12 * k), ln, fill="black", font=font)
    return grid


def reward_windows(rewards: list[float], most: int = 5) -> tuple[float, float, int]:
    """(mean of the first w, mean of the last w, w) for a run's per-epoch mean rewards, w = min(most, n // 2):
    the two windows never overlap, so a short run is not compared with itself. w = 0 (and NaN means) when the
    run has fewer than two epochs: too short to compare."""
    w = min(most, len(rewards) // 2)
    if w == 0:
        return math.nan, math.nan, 0
    return sum(rewards[:w]) / w, sum(rewards[-w:]) / w, w


# ================================================================================================ curves
PANEL_SIZE = (4.8, 3.2)  # inches per panel; at CURVES_DPI a panel is 480 x 320 pixels
CURVES_DPI = 100
PANEL_COLUMNS = 3


@dataclass
class Series:
    """One line of a panel: `values` of a metric at `epochs`; eval series are drawn dashed with markers."""

    label: str
    epochs: list[float]
    values: list[float]
    eval: bool = False
    color: int = 0  # index into matplotlib's colour cycle: one colour per run


@dataclass
class Panel:
    title: str
    series: list[Series] = field(default_factory=list)


def metric_series(rows: Iterable[dict[str, Any]], metric: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of `metric` over the rows that hold a finite number for it, by epoch; an epoch logged twice
    keeps its last row."""
    points: dict[float, float] = {}
    for row in rows:
        v, epoch = row.get(metric), row.get("epoch")
        if (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and isinstance(epoch, (int, float))):
            points[float(epoch)] = float(v)
    epochs = sorted(points)
    return epochs, [points[e] for e in epochs]


def reward_names(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The rewards named in the rows (`reward/<name>/mean`, `eval/reward/<name>/mean`), in order of appearance."""
    names: dict[str, None] = {}
    for row in rows:
        for key in row:
            for prefix in ("reward/", "eval/reward/"):
                if key.startswith(prefix) and key.endswith("/mean") and len(key) > len(prefix) + len("/mean"):
                    names.setdefault(key[len(prefix):-len("/mean")], None)
    return list(names)


def reward_panels(runs: dict[str, list[dict[str, Any]]]) -> list[Panel]:
    """The reward curves of one or more runs ({label: rows}): a panel for the combined reward (`reward/mean`,
    `eval/reward/mean`), then one per named reward (`reward/<name>/mean`, `eval/reward/<name>/mean`), each with a
    train and an eval series per run that logged it. Series are labelled `train`/`eval`, prefixed by the run's
    label when there are several runs."""
    names: dict[str, None] = {}
    for rows in runs.values():
        names.update(dict.fromkeys(reward_names(rows)))
    panels = []
    for title, train_key, eval_key in [("reward (combined)", "reward/mean", "eval/reward/mean"),
                                       *((f"reward: {n}", f"reward/{n}/mean", f"eval/reward/{n}/mean") for n in names)]:
        panel = Panel(title)
        for i, (label, rows) in enumerate(runs.items()):
            for key, is_eval in ((train_key, False), (eval_key, True)):
                epochs, values = metric_series(rows, key)
                if epochs:
                    kind = "eval" if is_eval else "train"
                    panel.series.append(Series(f"{label} {kind}" if len(runs) > 1 else kind, epochs, values,
                                               eval=is_eval, color=i))
        if panel.series:
            panels.append(panel)
    return panels


def metric_panels(runs: dict[str, list[dict[str, Any]]], metrics: list[str]) -> list[Panel]:
    """One panel per metric, one series per run that logged it (eval metrics dashed with markers)."""
    panels = []
    for metric in metrics:
        panel = Panel(metric)
        for i, (label, rows) in enumerate(runs.items()):
            epochs, values = metric_series(rows, metric)
            if epochs:
                panel.series.append(Series(label or metric, epochs, values, eval=metric.startswith("eval/"), color=i))
        panels.append(panel)
    return panels


def draw_curves(panels: list[Panel], title: str = "") -> Any:
    """A matplotlib Figure (Agg; no pyplot, so no global state) with the panels in a grid of up to
    PANEL_COLUMNS columns, each PANEL_SIZE inches at CURVES_DPI, x: epoch."""
    from matplotlib.figure import Figure

    n = max(1, len(panels))
    cols = min(PANEL_COLUMNS, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows), dpi=CURVES_DPI, layout="constrained")
    if title:
        fig.suptitle(title)
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        for s in panel.series:
            ax.plot(s.epochs, s.values, label=s.label, color=f"C{s.color % 10}",
                    **({"linestyle": "--", "marker": "o", "markersize": 3} if s.eval else {"linewidth": 1.2}))
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if panel.series:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    return fig


def save_figure(fig: Any, path: Path) -> None:
    """The figure as a PNG at `path`, written to a temporary file renamed into place: a reader (or a crash) never
    sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=CURVES_DPI)
    os.replace(tmp, path)
