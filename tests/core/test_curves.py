"""curves.png: the series plotted are the metrics rows' values, the PNG has the size of its panels, and a run's
MetricsLog redraws it at every eval and at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from flowfactory.train.logging import (
    CURVES_DPI,
    PANEL_SIZE,
    MetricsLog,
    draw_curves,
    metric_panels,
    metric_series,
    reward_names,
    reward_panels,
    save_figure,
)

PANEL_PX = (round(PANEL_SIZE[0] * CURVES_DPI), round(PANEL_SIZE[1] * CURVES_DPI))


def rows(n: int = 6, eval_every: int = 2) -> list[dict]:
    """Rows like a run's: a train reward `a` and, every `eval_every` epochs, eval rewards `a` and `gold`."""
    out = []
    for e in range(1, n + 1):
        row = {"epoch": e, "reward/mean": 0.1 * e, "reward/std": 0.5, "reward/a/mean": 0.2 * e, "loss": 1.0 / e}
        if e % eval_every == 0:
            row |= {"eval/reward/mean": 0.05 * e, "eval/reward/a/mean": 0.3 * e, "eval/reward/gold/mean": 1.0 - 0.1 * e}
        out.append(row)
    return out


def test_metric_series_takes_finite_numbers_by_epoch() -> None:
    data = [{"epoch": 2, "x": 2.0}, {"epoch": 1, "x": 1.0}, {"epoch": 3, "x": math.nan}, {"epoch": 4},
            {"epoch": 5, "x": "text"}, {"epoch": 6, "x": True}, {"epoch": 2, "x": 2.5}]
    assert metric_series(data, "x") == ([1.0, 2.0], [1.0, 2.5])  # sorted; epoch 2's last row wins


def test_reward_panels_pair_train_and_eval_per_reward() -> None:
    data = rows()
    assert reward_names(data) == ["a", "gold"]
    panels = reward_panels({"run": data})
    assert [p.title for p in panels] == ["reward (combined)", "reward: a", "reward: gold"]
    combined, a, gold = panels
    assert [(s.label, s.eval) for s in combined.series] == [("train", False), ("eval", True)]
    assert combined.series[0].epochs == [1, 2, 3, 4, 5, 6]
    assert combined.series[0].values == pytest.approx([0.1 * e for e in range(1, 7)])
    assert combined.series[1].epochs == [2, 4, 6]
    assert a.series[1].values == pytest.approx([0.6, 1.2, 1.8])
    assert [s.label for s in gold.series] == ["eval"]  # an eval-only (gold) reward: no train series
    assert gold.series[0].values == pytest.approx([0.8, 0.6, 0.4])


def test_several_runs_are_labelled_and_coloured_per_run() -> None:
    panels = reward_panels({"first": rows(4), "second": rows(6)})
    labels = [(s.label, s.color) for s in panels[0].series]
    assert labels == [("first train", 0), ("first eval", 0), ("second train", 1), ("second eval", 1)]
    loss = metric_panels({"first": rows(4), "second": rows(6)}, ["loss"])
    assert [p.title for p in loss] == ["loss"]
    assert [s.epochs for s in loss[0].series] == [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6]]


def test_the_figure_draws_the_series_and_the_png_has_its_size(tmp_path: Path) -> None:
    panels = reward_panels({"run": rows()})
    fig = draw_curves(panels, title="run")
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == [p.title for p in panels]
    for ax, panel in zip(axes, panels):
        lines = ax.get_lines()
        assert [ln.get_label() for ln in lines] == [s.label for s in panel.series]
        for ln, s in zip(lines, panel.series):
            assert list(ln.get_xdata()) == s.epochs and list(ln.get_ydata()) == pytest.approx(s.values)
            assert ln.get_linestyle() == ("--" if s.eval else "-")
    save_figure(fig, tmp_path / "sub" / "curves.png")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["curves.png"]  # no temporary file left
    with Image.open(tmp_path / "sub" / "curves.png") as img:
        assert img.format == "PNG"
        assert img.size == (3 * PANEL_PX[0], PANEL_PX[1])  # three panels in one row


def test_four_panels_wrap_to_a_second_row(tmp_path: Path) -> None:
    panels = metric_panels({"run": rows()}, ["loss", "reward/mean", "reward/std", "eval/reward/mean"])
    save_figure(draw_curves(panels), tmp_path / "c.png")
    with Image.open(tmp_path / "c.png") as img:
        assert img.size == (3 * PANEL_PX[0], 2 * PANEL_PX[1])


def test_metrics_log_draws_curves_at_each_eval_and_at_close(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, tensorboard=False, resume_epoch=None)
    data = rows(4)
    log.log(data[0])
    assert not (tmp_path / "curves.png").exists()  # no eval yet
    log.log(data[1])  # an eval row
    first = (tmp_path / "curves.png").read_bytes()
    log.log(data[2])
    assert (tmp_path / "curves.png").read_bytes() == first  # train-only rows do not redraw
    log.log(data[3])
    fourth = (tmp_path / "curves.png").read_bytes()
    assert fourth != first
    log.log({"epoch": 5, "reward/mean": 0.9, "reward/a/mean": 0.9})
    log.close()
    assert (tmp_path / "curves.png").read_bytes() != fourth  # the end redraws with epoch 5
    assert [json.loads(ln)["epoch"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]


def test_a_resumed_log_plots_the_rows_it_keeps(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, tensorboard=False, resume_epoch=None)
    for r in rows(6):
        log.log(r)
    log.close()
    resumed = MetricsLog(tmp_path, tensorboard=False, resume_epoch=4)
    assert [r["epoch"] for r in resumed.rows] == [1, 2, 3, 4]  # the plot covers the whole run so far
    panels = reward_panels({"": resumed.rows})
    assert panels[0].series[1].epochs == [2, 4]


def test_a_plotting_failure_is_a_note_not_a_stopped_run(tmp_path: Path, monkeypatch, capsys) -> None:
    import flowfactory.train.logging as logging_module

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(logging_module, "draw_curves", broken)
    log = MetricsLog(tmp_path, tensorboard=False, resume_epoch=None)
    for r in rows(2):
        log.log(r)
    log.close()
    assert capsys.readouterr().err.count(f"flowfactory: could not draw {tmp_path / 'curves.png'}: RuntimeError: "
                                         f"no fonts") == 2  # at the eval and at the end
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "curves.png").exists()
