"""The `ff` application: versions, help, plugin commands, the console-script entry point, import cost."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from typing import Any

import pytest
import typer

import flowfactory
import flowfactory.plugins as ff_plugins
import flowfactory_cli
from flowfactory import hookimpl
from flowfactory.errors import FlowFactoryError, PluginError
from flowfactory_cli import main as cli_main

BUILTIN = ["list", "plugins", "show", "validate", "plan", "run", "new", "plot"]


class HelloCommands:
    """A plugin adding a command and a command group."""

    @hookimpl
    def register_commands(self, app: typer.Typer) -> None:
        @app.command("hello")
        def hello(name: str = "world") -> None:
            """Say hello."""
            typer.echo(f"hello {name}")

        @app.command("fail")
        def fail() -> None:
            """Fail like a user error."""
            raise FlowFactoryError("demo.yaml: the plugin needs a `model` option; add one")

        tools = typer.Typer(help="Tools of the hello plugin.")

        @tools.command("count")
        def count(n: int) -> None:
            typer.echo(" ".join(str(i) for i in range(n)))

        app.add_typer(tools, name="hello-tools")


class BrokenCommands:
    @hookimpl
    def register_commands(self, app: typer.Typer) -> None:
        @app.command("half")
        def half() -> None:
            """Added before the hook fails; must not stay."""

        raise RuntimeError("no commands today")


class ClashingCommands:
    @hookimpl
    def register_commands(self, app: typer.Typer) -> None:
        @app.command()
        def list() -> None:
            typer.echo("plugin list")


@pytest.fixture
def command_state(make_state, components_plugin) -> ff_plugins.PluginState:
    return make_state((HelloCommands(), "flowfactory-hello", "0.2"), (BrokenCommands(), "flowfactory-broken", "0.3"),
                      (ClashingCommands(), "flowfactory-clash", "0.4"), components_plugin, strict=False)


def _versions(stdout: str) -> dict[str, str]:
    return dict(line.split(maxsplit=1) for line in stdout.splitlines())


def test_version_prints_core_cli_every_plugin_package_its_libraries_torch_and_diffusers(cli) -> None:
    result = cli("--version")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    plugin_packages = sorted({ep.dist.metadata["Name"] for ep in metadata.entry_points(group="flowfactory")}
                             | {"flowfactory-diffusers"})  # no entry point: listed as a package built on flowfactory
    assert names == ["flowfactory", "flowfactory-cli", *plugin_packages, "torch", "diffusers"]
    versions = _versions(result.stdout)
    assert versions["flowfactory"] == flowfactory.__version__
    assert versions["flowfactory-cli"] == flowfactory_cli.__version__
    for name in [*plugin_packages, "torch", "diffusers"]:
        try:
            expected = metadata.version(name)
        except metadata.PackageNotFoundError:
            expected = "not installed"
        assert versions[name] == expected, name


def test_cli_version_matches_the_installed_distribution() -> None:
    assert flowfactory_cli.__version__ == metadata.version("flowfactory-cli")
    assert flowfactory.__version__ == metadata.version("flowfactory")


def test_help_lists_the_commands(cli) -> None:
    result = cli("--help")
    assert result.exit_code == 0
    for name in BUILTIN:
        assert f"│ {name} " in result.stdout
    bare = cli()  # no arguments: the same help, as a usage error
    assert "Usage: ff [OPTIONS] COMMAND [ARGS]..." in bare.output
    assert "│ validate " in bare.output


def test_plugin_commands_are_added(cli, command_state) -> None:
    result = cli("hello", "--name", "flux", state=command_state, strict=False)
    assert (result.exit_code, result.stdout) == (0, "hello flux\n")
    result = cli("hello-tools", "count", "3", state=command_state, strict=False)
    assert (result.exit_code, result.stdout) == (0, "0 1 2\n")
    help_text = cli("--help", state=command_state, strict=False).stdout
    assert "│ hello " in help_text and "│ hello-tools " in help_text


def test_user_error_in_a_plugin_command_is_one_message(cli, command_state, user_error) -> None:
    user_error(cli("fail", state=command_state, strict=False),
               "Error: demo.yaml: the plugin needs a `model` option; add one")


def test_broken_command_hooks_are_isolated_and_recorded(cli, command_state) -> None:
    result = cli("plugins", "--json", state=command_state, strict=False)
    assert result.exit_code == 0
    errors = {r["package"]: r["error"] for r in json.loads(result.stdout)}
    assert errors["flowfactory-broken"] == "register_commands failed: RuntimeError: no commands today"
    assert errors["flowfactory-clash"] == ("register_commands failed: it adds the command 'list', which `ff` "
                                           "already has; rename it in the plugin")
    assert errors["flowfactory-hello"] is None
    half = cli("half", state=command_state, strict=False)
    assert half.exit_code == 2
    assert "No such command 'half'" in half.stderr
    listing = cli("list", "policy", "--json", state=command_state, strict=False)  # the built-in `list` stays
    assert [r["name"] for r in json.loads(listing.stdout)] == ["tiny-policy"]


def test_broken_command_hook_in_strict_mode_names_the_package(make_state) -> None:
    state = make_state((BrokenCommands(), "flowfactory-broken", "0.3"), strict=False)
    with pytest.raises(PluginError) as info:
        cli_main.create_app(state, strict=True)
    assert str(info.value) == ("the commands of plugin flowfactory-broken 0.3 could not be added: RuntimeError: "
                               "no commands today. Fix or uninstall that package "
                               "(FLOWFACTORY_STRICT_PLUGINS=1 makes this an error).")


def test_create_app_builds_a_fresh_app_each_time(make_state) -> None:
    state = make_state((HelloCommands(), "flowfactory-hello", "0.2"))
    first, second = cli_main.create_app(state), cli_main.create_app(state)
    assert first is not second
    names = [c.name for c in second.registered_commands]
    assert names == [*BUILTIN, "hello", "fail"]  # plugin commands added once, after the built-ins


def test_main_uses_the_process_wide_state(plugin_state, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(["list", "optimizer", "--json"])
    assert exit_info.value.code == 0
    assert json.loads(capsys.readouterr().out) == [
        {"kind": "optimizer", "name": "fake-opt", "package": "test-plugins", "version": "1.0",
         "summary": "A test optimizer."}]


def test_main_reports_plugin_errors_without_traceback(monkeypatch, capsys) -> None:
    def fail() -> Any:
        raise PluginError("plugin 'x' from flowfactory-x 1 failed to load: ImportError: nope. Fix or uninstall "
                          "that package (FLOWFACTORY_STRICT_PLUGINS=1 makes this an error).")

    monkeypatch.setattr(ff_plugins, "get_state", fail)
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(["list"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("Error: plugin 'x' from flowfactory-x 1 failed to load: ImportError: nope. Fix or "
                            "uninstall that package (FLOWFACTORY_STRICT_PLUGINS=1 makes this an error).\n")


HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "matplotlib", "wandb")

IMPORT_CHECK = f"""
import sys
from flowfactory_cli.main import main
for args in (["--help"], ["--version"], ["list"], ["list", "--json"], ["plugins"], ["show", "sampler", "ode"]):
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), (args, exc.code)
print("HEAVY=" + ",".join(m for m in {HEAVY!r} if m in sys.modules))
"""


def test_fast_commands_import_no_heavy_module() -> None:
    """With every installed plugin loaded (entry points included), help, version, list, plugins and show stay
    free of torch & co: checked in a fresh interpreter, since this test session may have imported torch."""
    proc = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "HEAVY="


def test_python_dash_m_runs_ff() -> None:
    proc = subprocess.run([sys.executable, "-m", "flowfactory_cli", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    versions = _versions(proc.stdout)
    assert (versions["flowfactory"], versions["flowfactory-cli"]) == (flowfactory.__version__,
                                                                      flowfactory_cli.__version__)
