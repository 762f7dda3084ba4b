"""`ff list` and `ff plugins`: what is installed, as tables and as JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

import flowfactory
import flowfactory.plugins as ff_plugins
from flowfactory import hookimpl


def _rows(stdout: str) -> list[list[str]]:
    """Cells of a rich table's body rows (lines holding the column separator)."""
    return [[c.strip() for c in line.split("│")] for line in stdout.splitlines() if "│" in line]


def test_list_shows_every_component_with_package_and_version(cli, plugin_state) -> None:
    result = cli("list")
    assert result.exit_code == 0, result.output
    rows = _rows(result.stdout)
    version = flowfactory.__version__
    assert ["policy", "tiny-policy", "test-plugins", "1.0", "A tiny test policy."] in rows
    assert ["optimizer", "fake-opt", "test-plugins", "1.0", "A test optimizer."] in rows
    assert ["reward", "brightness", "flowfactory", version, "Mean luma of the image in [0, 1]."] in rows
    samplers = [r[:4] for r in rows if r[0] == "sampler"]
    assert ["sampler", "flow-sde", "flowfactory", version] in samplers
    assert ["sampler", "ode", "flowfactory", version] in samplers
    assert [r[1] for r in samplers] == sorted(r[1] for r in samplers)
    assert [r[1] for r in rows] == [s.name for s in plugin_state.registry.specs()]  # kind order, then name
    header = result.stdout.splitlines()[0]
    assert [h.strip() for h in header.split("┃")] == ["kind", "name", "package", "version", "summary"]


def test_list_fits_an_80_column_terminal_without_losing_text(plugin_state) -> None:
    from typer.testing import CliRunner

    from flowfactory_cli.main import create_app

    result = CliRunner().invoke(create_app(plugin_state, strict=True), ["list"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert [h.strip() for h in lines[0].split("┃")] == ["kind", "name", "package", "summary"]  # version joins package
    # each component's cells, folded over several lines, still hold every character of its record
    cells: list[list[str]] = []
    for line in lines[2:]:
        parts = [c.strip() for c in line.split("│")]
        if parts[0]:
            cells.append(parts)
        else:
            cells[-1] = [a + b for a, b in zip(cells[-1], parts)]
    squash = "".join
    assert [c[1] for c in cells] == [s.name for s in plugin_state.registry.specs()]
    for c, spec in zip(cells, plugin_state.registry.specs()):
        assert squash(c[2].split()) == squash(f"{spec.package} {spec.version}".split())
        assert squash(c[3].split()) == squash(spec.summary.split())


def test_list_json_is_a_list_of_records(cli, plugin_state) -> None:
    result = cli("list", "--json")
    assert result.exit_code == 0
    records = json.loads(result.stdout)
    assert records == [{"kind": s.kind, "name": s.name, "package": s.package, "version": s.version,
                        "summary": s.summary} for s in plugin_state.registry.specs()]
    assert {"kind": "policy", "name": "tiny-policy", "package": "test-plugins", "version": "1.0",
            "summary": "A tiny test policy."} in records


@pytest.mark.parametrize("kind", ["reward", "rewards", "REWARD"])
def test_list_one_kind(cli, plugin_state, kind: str) -> None:
    records = json.loads(cli("list", kind, "--json").stdout)
    assert [r["name"] for r in records] == plugin_state.registry.names("reward")
    assert {r["kind"] for r in records} == {"reward"}


def test_list_of_an_empty_kind_says_so(cli, make_state) -> None:
    result = cli("list", "policy", state=make_state())
    assert result.exit_code == 0
    assert result.stdout.strip() == ("No policies are installed. Plugin packages add them, "
                                     "e.g. `pip install flowfactory-flux`.")
    assert json.loads(cli("list", "policy", "--json", state=make_state()).stdout) == []


def test_list_with_a_wrong_kind_lists_the_kinds(cli, user_error) -> None:
    result = cli("list", "models")
    user_error(result, "unknown component kind 'models'; kinds are policy, sampler, reward, optimizer.")


def _broken() -> Any:
    raise ImportError("No module named 'torchvision'")


class ExtraReward:
    @hookimpl
    def register_rewards(self, register: Callable[..., Any]) -> None:
        register("extra", lambda o, c: None, summary="An extra reward.")


@pytest.fixture
def broken_state(fake_entry_points) -> ff_plugins.PluginState:
    """A non-strict state with one broken and one working entry point."""
    fake_entry_points(("broken", "flowfactory-broken", "0.9", _broken),
                      ("extra", "flowfactory-extra", "2.0", ExtraReward))
    return ff_plugins.load(strict=False)


def test_list_warns_about_failed_plugins_on_stderr(cli, broken_state) -> None:
    result = cli("list", "--json", state=broken_state, strict=False)
    assert result.exit_code == 0
    assert "extra" in [r["name"] for r in json.loads(result.stdout)]  # stdout stays valid JSON
    assert result.stderr == ("Warning: 1 plugin failed to load (flowfactory-broken); their components are "
                             "missing. `ff plugins` shows why.\n")


def test_plugins_json_shows_each_plugin_and_its_error(cli, broken_state) -> None:
    result = cli("plugins", "--json", state=broken_state, strict=False)
    assert result.exit_code == 0
    records = {r["name"]: r for r in json.loads(result.stdout)}
    broken_error = records["broken"].pop("error")
    assert broken_error.startswith("ImportError: No module named 'torchvision' (at ")
    assert f"{__file__}:{_broken.__code__.co_firstlineno + 1}" in broken_error  # the line that raised
    assert records["broken"] == {"name": "broken", "package": "flowfactory-broken", "version": "0.9",
                                 "entry_point": "broken = broken_module", "hooks": [], "warning": None,
                                 "slow_imports": []}
    assert records["extra"] == {"name": "extra", "package": "flowfactory-extra", "version": "2.0",
                                "entry_point": "extra = extra_module", "hooks": ["register_rewards"],
                                "error": None, "warning": None, "slow_imports": []}
    assert records["flowfactory.samplers"]["package"] == "flowfactory"
    assert records["flowfactory.samplers"]["hooks"] == ["register_samplers"]
    assert list(records) == ["flowfactory.samplers", "flowfactory.rewards", "broken", "extra"]


def test_plugins_table_marks_failures(cli, broken_state) -> None:
    result = cli("plugins", state=broken_state, strict=False)
    assert result.exit_code == 0
    rows = {r[0]: r for r in _rows(result.stdout) if r[0]}
    assert rows["broken"][:4] == ["broken", "flowfactory-broken", "0.9", "-"]
    assert rows["broken"][4].startswith("failed: ImportError: No module named 'torchvision' (at ")
    assert rows["extra"] == ["extra", "flowfactory-extra", "2.0", "register_rewards", "ok"]
    assert rows["flowfactory.rewards"][1:] == ["flowfactory", flowfactory.__version__, "register_rewards", "ok"]
