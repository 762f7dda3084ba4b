"""What a run leaves, from the CLI: `ff plot` overlays the reward curves of run folders into one PNG (a folder
without metrics is a clear error); `ff validate` refuses W&B logging when wandb is not installed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from PIL import Image

from flowfactory.train.logging import CURVES_DPI, PANEL_SIZE

PANEL_PX = (round(PANEL_SIZE[0] * CURVES_DPI), round(PANEL_SIZE[1] * CURVES_DPI))


def run_folder(path: Path, epochs: int, slope: float) -> Path:
    """A run folder as `ff run` leaves it, as far as `ff plot` reads: metrics.jsonl, an eval every 2 epochs."""
    path.mkdir(parents=True)
    lines = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "reward/mean": slope * e, "reward/brightness/mean": slope * e, "loss": 1.0 / e}
        if e % 2 == 0:
            row |= {"eval/reward/mean": slope * e / 2, "eval/reward/brightness/mean": slope * e / 2}
        lines.append(json.dumps(row))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_two_runs_overlaid_into_one_png(cli, tmp_path: Path) -> None:
    a = run_folder(tmp_path / "runs" / "a", 6, 0.1)
    b = run_folder(tmp_path / "runs" / "b", 4, 0.2)
    out = tmp_path / "plots" / "ab.png"
    result = cli("plot", str(a), str(b), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote {out}"
    assert png_size(out) == (2 * PANEL_PX[0], PANEL_PX[1])  # combined reward + brightness
    assert not (a / "curves.png").exists() and not (b / "curves.png").exists()


def test_one_run_writes_into_its_folder_and_metrics_pick_panels(cli, tmp_path: Path, user_error) -> None:
    a = run_folder(tmp_path / "a", 6, 0.1)
    assert cli("plot", str(a)).exit_code == 0
    assert png_size(a / "curves.png") == (2 * PANEL_PX[0], PANEL_PX[1])
    out = tmp_path / "m.png"
    metrics = ["--metric", "loss", "-m", "eval/reward/mean", "-m", "reward/mean", "-m", "reward/brightness/mean"]
    result = cli("plot", str(a), *metrics, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert png_size(out) == (3 * PANEL_PX[0], 2 * PANEL_PX[1])  # four panels: three columns, two rows
    user_error(cli("plot", str(a), "-m", "loss", "-m", "reward/std"),
               "no run logged 'reward/std'; they logged eval/reward/brightness/mean, eval/reward/mean, loss, ")


def test_several_runs_default_to_curves_png_here(cli, tmp_path: Path, monkeypatch) -> None:
    a = run_folder(tmp_path / "x" / "run", 4, 0.1)
    b = run_folder(tmp_path / "y" / "run", 4, 0.2)  # same folder name: labelled by path
    monkeypatch.chdir(tmp_path)
    result = cli("plot", os.path.relpath(a), os.path.relpath(b))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "curves.png").is_file()


def test_a_folder_without_metrics_is_a_clear_error(cli, tmp_path: Path, user_error) -> None:
    a = run_folder(tmp_path / "a", 4, 0.1)
    empty = tmp_path / "empty"
    empty.mkdir()
    user_error(cli("plot", str(a), str(empty)),
               f"{empty} holds no metrics.jsonl: it is not a run folder, or its run has not finished an epoch yet")
    user_error(cli("plot", str(tmp_path / "missing")), f"{tmp_path / 'missing'} is not a folder")
    (empty / "metrics.jsonl").write_text("")
    user_error(cli("plot", str(empty)), "holds no metrics rows yet")
    assert not (a / "curves.png").exists()


def test_validate_refuses_wandb_when_it_is_not_installed(cli, config_file, user_error, monkeypatch) -> None:
    path = config_file(train={"epochs": 3, "group_size": 4, "prompts_per_epoch": 2,
                              "wandb": {"enabled": True, "project": "p", "mode": "offline"}})
    assert cli("validate", str(path)).exit_code == 0  # installed here (requirements.txt)
    monkeypatch.setitem(sys.modules, "wandb", None)  # what importlib sees when it is not installed
    user_error(cli("validate", str(path)), f"{path}: 1 problem",
               "train.wandb.enabled: wandb is not installed; `pip install 'flowfactory[wandb]'`, or set "
               "train.wandb.enabled: false")
    assert cli("validate", str(path), "--set", "train.wandb.enabled=false").exit_code == 0
