"""`ff validate` and `ff run`: config loading, the summary printed, user errors and Ctrl-C.

`flowfactory.train.run` is replaced by a fake that records its arguments: these tests check the CLI's
handling, not training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import flowfactory.train as ff_train
from flowfactory.errors import FlowFactoryError
from flowfactory.train.loop import RunSummary
from flowfactory_cli.main import resume_command
from flowfactory_cli.render import duration

SUMMARY = RunSummary(output_dir="out/run", epochs=12, reward_first=0.25, reward_last=0.75,
                      final_dir="out/run/final", metrics_path="out/run/metrics.jsonl",
                      samples_dir="out/run/samples", wall_seconds=65.2, resumed_from=6)


@pytest.fixture
def fake_run(monkeypatch) -> list[dict[str, Any]]:
    """Replace the training loop; returns the list of recorded calls."""
    calls: list[dict[str, Any]] = []

    def run(cfg: Any, options: dict[str, Any], **kwargs: Any) -> RunSummary:
        calls.append({"cfg": cfg, "options": options, **kwargs})
        return SUMMARY

    monkeypatch.setattr(ff_train, "run", run)
    return calls


def _grid(stdout: str) -> dict[str, str]:
    """Label -> value of the two-column summaries (labels are single or two words)."""
    out = {}
    for line in stdout.splitlines():
        line = line.strip("│ ")
        if "  " in line:
            label, value = line.split("  ", 1)
            out[label.strip()] = value.strip()
    return out


# --- validate ----------------------------------------------------------------------------------------------

def test_validate_prints_a_summary_of_the_run(cli, config_file) -> None:
    path = config_file()
    result = cli("validate", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"{path} is valid."
    grid = _grid(result.stdout)
    assert grid["name"] == "test-run"
    assert grid["policy"] == "tiny-policy (test-plugins 1.0)"
    assert grid["sampler"].startswith("flow-sde (flowfactory ")
    assert grid["rewards"].startswith("brightness (flowfactory ") and grid["rewards"].endswith(" weight 1")
    assert "jpeg-compressibility" in result.stdout and "weight 0.5" in result.stdout
    assert grid["optimizer"] == "fake-opt (test-plugins 1.0)"
    assert grid["data"] == "train colours, eval colours-eval"
    assert grid["epochs"] == "3"
    assert grid["group size"] == "4 rollouts per prompt, 2 prompts per epoch (8 rollouts per epoch)"
    assert grid["output"] == "runs/test-run"


def test_validate_applies_overrides(cli, config_file) -> None:
    result = cli("validate", str(config_file()), "--set", "train.epochs=7", "-s", "output_dir=elsewhere")
    assert result.exit_code == 0, result.output
    assert _grid(result.stdout)["epochs"] == "7"
    assert _grid(result.stdout)["output"] == "elsewhere"


def test_validate_reports_every_problem(cli, config_file, user_error) -> None:
    path = config_file(train={"epochs": 0}, rewards=[{"name": "brightnes"}],
                       policy={"name": "tiny-policy", "options": {"lora": {"rnk": 2}}})
    result = cli("validate", str(path))
    user_error(result, f"{path}: 3 problems",
               "train.epochs: Input should be greater than or equal to 1",
               "rewards[0].name: no reward named 'brightnes' is installed. Did you mean 'brightness'?",
               "policy.options.lora.rnk: unknown key; remove it or check its spelling (did you mean 'rank'?); "
               "`ff show policy tiny-policy` lists the options")


def test_validate_bad_override_path(cli, config_file, user_error) -> None:
    path = config_file()
    user_error(cli("validate", str(path), "--set", "rewards.9.weight=1"),
               f"{path}: 1 problem", "--set rewards.9.weight: this path does not exist in the config")


def test_validate_missing_file(cli, tmp_path: Path, user_error) -> None:
    path = tmp_path / "missing.yaml"
    user_error(cli("validate", str(path)), f"Error: {path}: no such config file; check the path")


def test_validate_unknown_component_of_a_failed_plugin_mentions_it(cli, config_file, fake_entry_points) -> None:
    import flowfactory.plugins as ff_plugins

    def broken() -> Any:
        raise ImportError("boom")

    fake_entry_points(("tiny", "flowfactory-tiny", "1", broken))
    state = ff_plugins.load(strict=False)
    result = cli("validate", str(config_file()), state=state, strict=False)
    assert result.exit_code == 2
    assert "Warning: 1 plugin failed to load (flowfactory-tiny)" in result.stderr
    assert "policy.name: no policy named 'tiny-policy' is installed." in result.stderr


# --- run ---------------------------------------------------------------------------------------------------

def test_run_passes_the_validated_config_and_prints_the_summary(cli, config_file, fake_run, tmp_path: Path,
                                                                monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # SUMMARY's relative paths; the panel lists only those that exist
    for folder in ("out/run/final", "out/run/samples"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "out/run/metrics.jsonl").write_text("")
    path = config_file()
    out_dir = tmp_path / "out"
    result = cli("run", str(path), "--set", "train.epochs=9", "--output", str(out_dir), "--resume")
    assert result.exit_code == 0, result.output
    [call] = fake_run
    assert call["cfg"].train.epochs == 9
    assert call["cfg"].policy.name == "tiny-policy"
    assert set(call["options"]) == {"policy", "sampler", "optimizer", "rewards[0]", "rewards[1]"}
    assert call["options"]["policy"].lora.rank == 2
    assert (call["output_dir"], call["resume"], call["source"]) == (str(out_dir), True, str(path))
    assert call["resume_command"] == f"ff run {path} --set train.epochs=9 --output {out_dir} --resume"
    grid = _grid(result.stdout)
    assert grid["epochs"] == "12 (resumed after epoch 6)"
    assert grid["mean reward"] == "0.2500 -> 0.7500 (+0.5000), first vs last 5 epochs"
    assert grid["output"] == "out/run"
    assert grid["final model"] == "out/run/final"
    assert grid["metrics"] == "out/run/metrics.jsonl"
    assert grid["samples"] == "out/run/samples"
    assert grid["wall time"] == "1m 05s"
    assert "run finished" in result.stdout


def test_run_defaults(cli, config_file, fake_run, monkeypatch) -> None:
    monkeypatch.setattr(SUMMARY, "resumed_from", None)
    result = cli("run", str(config_file()))
    assert result.exit_code == 0, result.output
    assert (fake_run[0]["output_dir"], fake_run[0]["resume"]) == (None, False)
    assert _grid(result.stdout)["epochs"] == "12"


def test_run_with_an_invalid_config_does_not_train(cli, config_file, fake_run, user_error) -> None:
    user_error(cli("run", str(config_file(sampler={"name": "odee"}))),
               "sampler.name: no sampler named 'odee' is installed. Did you mean 'ode'?")
    assert fake_run == []


def test_run_user_error_from_the_loop(cli, config_file, monkeypatch, user_error) -> None:
    def run(*args: Any, **kwargs: Any) -> None:
        raise FlowFactoryError("runs/test-run already holds a run. Continue it with `ff run x --resume`.")

    monkeypatch.setattr(ff_train, "run", run)
    user_error(cli("run", str(config_file())),
               "Error: runs/test-run already holds a run. Continue it with `ff run x --resume`.")


def test_a_folder_that_holds_a_run_names_the_full_command_to_resume(cli, config_file, tmp_path, user_error) -> None:
    """The real loop (no fake): it stops before loading anything and gives back the user's --set and --output."""
    out_dir = tmp_path / "held run"
    out_dir.mkdir()
    (out_dir / "metrics.jsonl").write_text('{"epoch": 1, "reward/mean": 0.5}\n')
    path = config_file()
    result = cli("run", str(path), "--output", str(out_dir), "--set", "train.epochs=3", "-s", "name=my run")
    user_error(result, f"Error: {out_dir} already holds a run. Continue it with "
                       f"`ff run {path} --set train.epochs=3 --set 'name=my run' --output '{out_dir}' --resume`, "
                       f"or write elsewhere with `--output DIR`.")


def test_the_loop_names_a_resume_command_without_the_cli(config_file, plugin_state, tmp_path) -> None:
    """Called from Python with no resume_command, the message still names the config and the --output given."""
    from flowfactory.config import load
    from flowfactory.train import run

    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / "metrics.jsonl").write_text("")
    path = config_file()
    cfg, options = load(path, registry=plugin_state.registry)
    with pytest.raises(FlowFactoryError, match=rf"Continue it with `ff run {path} --output {out_dir} --resume`"):
        run(cfg, options, output_dir=str(out_dir), source=str(path), registry=plugin_state.registry,
            show_progress=False)


def test_run_bug_in_the_loop_is_not_hidden(cli, config_file, monkeypatch) -> None:
    def run(*args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(ff_train, "run", run)
    with pytest.raises(ZeroDivisionError):
        cli("run", str(config_file()))


def test_ctrl_c_prints_how_to_resume_and_exits_130(cli, config_file, monkeypatch, tmp_path: Path) -> None:
    def run(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ff_train, "run", run)
    path = config_file()
    result = cli("run", str(path), "--set", "name=my run", "--output", str(tmp_path / "o"))
    assert result.exit_code == 130
    assert result.stdout == ""
    assert "Traceback" not in result.output
    assert result.stderr.splitlines() == [
        "",
        "Interrupted. Continue from the last checkpoint with:",
        f"  ff run {path} --set 'name=my run' --output {tmp_path / 'o'} --resume",
    ]


def test_resume_command_quotes_what_the_shell_needs() -> None:
    assert resume_command(Path("my runs/a.yaml"), ["train.epochs=5"], None) == (
        "ff run 'my runs/a.yaml' --set train.epochs=5 --resume")
    assert resume_command(Path("a.yaml"), None, Path("out")) == "ff run a.yaml --output out --resume"


@pytest.mark.parametrize(("seconds", "text"), [(0.04, "0.0s"), (12.34, "12.3s"), (65.2, "1m 05s"),
                                               (3600 + 125, "1h 02m 05s")])
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_only_rank_zero_prints_the_summary(cli, config_file, fake_run, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    result = cli("run", str(config_file()))
    assert result.exit_code == 0
    assert len(fake_run) == 1  # every process trains
    assert result.stdout == ""
    monkeypatch.setenv("RANK", "0")
    assert "run finished" in cli("run", str(config_file())).stdout


@pytest.mark.parametrize(("window", "expected"), [
    (3, "0.2500 -> 0.7500 (+0.5000), first vs last 3 epochs"),
    (1, "0.2500 -> 0.7500 (+0.5000), first vs last epoch"),
    (0, "run too short to compare (one epoch)"),
])
def test_summary_panel_names_its_windows_and_lists_only_written_paths(tmp_path: Path, window: int,
                                                                     expected: str) -> None:
    from rich.console import Console

    from flowfactory_cli.render import run_summary_panel

    (tmp_path / "final").mkdir()
    (tmp_path / "metrics.jsonl").write_text("")
    summary = RunSummary(output_dir=str(tmp_path), epochs=6, reward_first=0.25, reward_last=0.75,
                         final_dir=str(tmp_path / "final"), metrics_path=str(tmp_path / "metrics.jsonl"),
                         samples_dir=str(tmp_path / "samples"), wall_seconds=3.0, resumed_from=None, window=window)
    console = Console(width=400, record=True)
    console.print(run_summary_panel(summary))
    grid = _grid(console.export_text())
    assert grid["mean reward"] == expected
    assert grid["final model"] == str(tmp_path / "final")
    assert "samples" not in grid  # never written (sample_every: 0)


def test_summary_panel_names_the_best_model(tmp_path: Path) -> None:
    from rich.console import Console

    from flowfactory_cli.render import run_summary_panel

    (tmp_path / "best").mkdir()
    summary = RunSummary(output_dir=str(tmp_path), epochs=6, reward_first=0.25, reward_last=0.75,
                         final_dir=str(tmp_path / "final"), metrics_path=str(tmp_path / "metrics.jsonl"),
                         samples_dir=None, wall_seconds=3.0, resumed_from=None,
                         best={"metric": "eval/reward/gold/mean", "value": 0.8125, "epoch": 4,
                               "dir": str(tmp_path / "best")})
    console = Console(width=400, record=True)
    console.print(run_summary_panel(summary))
    assert _grid(console.export_text())["best model"] == f"{tmp_path / 'best'} (epoch 4, eval/reward/gold/mean 0.8125)"


def test_a_guard_stop_exits_3_with_its_message(cli, config_file, monkeypatch) -> None:
    from flowfactory.train.guard import RewardHackingError

    def stopped(*args: Any, **kwargs: Any) -> RunSummary:
        raise RewardHackingError("reward hacking suspected: eval metric eval/reward/gold/mean fell")

    monkeypatch.setattr(ff_train, "run", stopped)
    result = cli("run", str(config_file()))
    assert result.exit_code == 3
    assert "reward hacking suspected" in result.output
