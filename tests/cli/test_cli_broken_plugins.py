"""Broken plugin packages, really installed, through the real `ff`: each is recorded with its own file:line,
its components left out, and `ff` keeps working; strict mode refuses them but `ff plugins` still prints its
table.

The packages are written as an installer (`pip install --target`) leaves them: modules plus a
`<dist>-<version>.dist-info` folder with METADATA and entry_points.txt, on a folder put on PYTHONPATH of a
subprocess `python -m flowfactory_cli` (or on sys.path in-process). So discovery goes through
importlib.metadata's entry points and each module through the import system, as for any installed plugin;
the first-party plugins of this environment load beside them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import flowfactory
import flowfactory.plugins as ff_plugins
from flowfactory import hookimpl

# dist name -> (entry point name, module, source); a module of None: the entry point names a missing module
PACKAGES: dict[str, tuple[str, str, str | None]] = {
    "flowfactory-dup": ("dup", "ffx_dup", '''from flowfactory import hookimpl

@hookimpl
def register_rewards(register):
    register("dup-extra", lambda options, ctx: None)
    register("brightness", lambda options, ctx: None, summary="a second brightness")
'''),
    "flowfactory-typo": ("typo", "ffx_typo", '''from flowfactory import hookimpl

@hookimpl
def register_reward(register):
    register("typo-reward", lambda options, ctx: None)
'''),
    "flowfactory-badopts": ("badopts", "ffx_badopts", '''from flowfactory import hookimpl

@hookimpl
def register_rewards(register):
    register("badopts-reward", lambda options, ctx: None, options={"quality": 90})
'''),
    "flowfactory-badarg": ("badarg", "ffx_badarg", '''from flowfactory import hookimpl

@hookimpl
def register_rewards(registr):
    registr("badarg-reward", lambda options, ctx: None)
'''),
    "flowfactory-nohooks": ("nohooks", "ffx_nohooks", '''def register_rewards(register):
    register("nohooks-reward", lambda options, ctx: None)
'''),
    "flowfactory-missing": ("missing", "ffx_not_there", None),
    "flowfactory-fine": ("fine", "ffx_fine", '''from flowfactory import Register, hookimpl

@hookimpl
def register_rewards(register: Register) -> None:
    register("fine-reward", lambda options, ctx: None, summary="Installed beside the broken ones.")
'''),
}


def install(target: Path, packages: dict[str, tuple[str, str, str | None]]) -> Path:
    """Write `packages` into `target` the way `pip install --target` lays them out."""
    for dist, (ep_name, module, source) in packages.items():
        if source is not None:
            (target / f"{module}.py").write_text(source)
        info = target / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[flowfactory]\n{ep_name} = {module}\n")
        (info / "RECORD").write_text("")
    return target


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return install(tmp_path_factory.mktemp("site"), PACKAGES)


def ff(site: Path, *args: str, strict: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "FLOWFACTORY_STRICT_PLUGINS": "1" if strict else "0", "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "flowfactory_cli", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=cwd)


def line_of(site: Path, module: str, text: str) -> str:
    """'<file>:<line>' of the first line of `module` in `site` that holds `text`."""
    path = site / f"{module}.py"
    number = next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)
    return f"{path}:{number}"


def test_help_and_list_work_with_every_broken_plugin_installed(site: Path) -> None:
    helped = ff(site, "--help")
    assert helped.returncode == 0, helped.stderr
    assert "│ plugins " in helped.stdout
    listed = ff(site, "list", "reward", "--json")
    assert listed.returncode == 0, listed.stderr
    rewards = {r["name"]: r["package"] for r in json.loads(listed.stdout)}
    assert rewards["brightness"] == "flowfactory"  # the first loaded keeps a contested name
    assert rewards["fine-reward"] == "flowfactory-fine"
    assert not {"dup-extra", "typo-reward", "badopts-reward", "badarg-reward", "nohooks-reward"} & set(rewards)
    assert listed.stderr.startswith("Warning: 5 plugins failed to load (flowfactory-badarg, flowfactory-badopts, "
                                    "flowfactory-dup, flowfactory-missing, flowfactory-typo)")


def test_ff_plugins_shows_each_problem_at_the_plugins_own_line(site: Path) -> None:
    result = ff(site, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    records = {r["package"]: r for r in json.loads(result.stdout)}
    assert records["flowfactory-fine"]["error"] is None and records["flowfactory-fine"]["warning"] is None
    dup = records["flowfactory-dup"]["error"]
    where = line_of(site, "ffx_dup", 'register("brightness"')
    assert dup.startswith(f"reward 'brightness' (registered at {where}) "
                          f"is already registered by flowfactory {flowfactory.__version__} (at ")
    assert "every component of flowfactory-dup is left out" in dup
    assert records["flowfactory-typo"]["error"].startswith(
        f"implements unknown hook 'register_reward' (did you mean 'register_rewards'?) at "
        f"{line_of(site, 'ffx_typo', '@hookimpl')}; ")
    assert records["flowfactory-badopts"]["error"].startswith(
        f"register_rewards: reward 'badopts-reward' options must be a pydantic model class, not dict (at "
        f"{line_of(site, 'ffx_badopts', 'register(')}); ")
    assert records["flowfactory-badarg"]["error"].startswith(
        f"hook register_rewards(registr) at {line_of(site, 'ffx_badarg', '@hookimpl')} takes 'registr'")
    assert records["flowfactory-missing"]["error"] == (
        "entry point `missing = ffx_not_there` of flowfactory-missing names module 'ffx_not_there', which is not "
        "installed (no module named 'ffx_not_there'); fix it under [project.entry-points.flowfactory] in "
        "flowfactory-missing's pyproject.toml and reinstall")
    nohooks = records["flowfactory-nohooks"]
    assert nohooks["error"] is None
    assert nohooks["warning"].startswith(f"it implements no flowfactory hook: nothing in {site / 'ffx_nohooks.py'} "
                                         "is marked @flowfactory.hookimpl")
    assert all("pluggy" not in str(r["error"]) and "importlib" not in str(r["error"]) for r in records.values())


def test_a_config_naming_a_contested_component_is_refused_naming_both_packages(site: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("name: contested\npolicy: {name: flux, options: {preset: tiny}}\nsampler: {name: flow-sde}\n"
                      "rewards: [{name: brightness}]\noptimizer: {name: grpo}\n")
    result = ff(site, "validate", str(config))
    assert result.returncode == 2
    assert (f"rewards[0].name: reward 'brightness' is registered by more than one package: flowfactory "
            f"{flowfactory.__version__} and flowfactory-dup 1.0. A config naming it could mean either, so it is "
            "refused. Uninstall one of them (e.g. `pip uninstall flowfactory-dup`)") in result.stderr
    assert "Traceback" not in result.stderr


def test_strict_mode_refuses_every_command_but_ff_plugins_still_prints_its_table(site: Path) -> None:
    listed = ff(site, "list", strict=True)
    assert listed.returncode == 2 and listed.stdout == ""
    assert listed.stderr.startswith("Error: 6 plugins have problems:\n  plugin 'badarg' from flowfactory-badarg 1.0: ")
    assert "  plugin 'nohooks' from flowfactory-nohooks 1.0: it implements no flowfactory hook" in listed.stderr
    table = ff(site, "plugins", strict=True)
    assert table.returncode == 2
    rows = {line.split("│")[1].strip(): line for line in table.stdout.splitlines() if "│" in line}
    assert "failed: implements unknown hook 'register_reward'" in rows["flowfactory-typo"]
    assert "ok" in rows["flowfactory-fine"]
    assert table.stderr.startswith("Error: 6 plugins have a problem (see above); FLOWFACTORY_STRICT_PLUGINS=1")
    version = ff(site, "--version", strict=True)
    assert version.returncode == 0, version.stderr
    assert "flowfactory-dup  " in version.stdout and "flowfactory-fine  " in version.stdout


@pytest.fixture
def installed(tmp_path: Path, monkeypatch) -> Iterator[Path]:
    """A folder on sys.path, read by importlib.metadata like site-packages; its modules are forgotten after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("ffx_"):
            del sys.modules[name]


def test_an_entry_point_module_importing_torch_is_flagged_in_process(installed: Path) -> None:
    install(installed, {"flowfactory-heavy": ("heavy", "ffx_heavy", "from ffx_heavy_helper import HELPER\n"
                                                                     "from flowfactory import hookimpl\n\n@hookimpl\n"
                                                                     "def register_rewards(register):\n"
                                                                     "    register('heavy-reward', lambda o, c: None)\n")})
    (installed / "ffx_heavy_helper.py").write_text("import torch\nHELPER = 1\n")  # the heavy import, one step away
    state = ff_plugins.load(strict=True)  # slow is not broken: it loads, in strict mode too
    assert state.registry.get("reward", "heavy-reward").package == "flowfactory-heavy"
    slow = {p.package: p.slow_imports for p in state.plugins if p.slow_imports}
    # torch is named with the line that imported it; the shipped entry points import nothing heavy
    assert slow == {"flowfactory-heavy": [f"torch (at {installed / 'ffx_heavy_helper.py'}:1)"]}
    assert len(state.plugins) > 3  # the first-party plugins were loaded beside it


class Shiny:
    @hookimpl
    def register_rewards(self, register: Any) -> None:
        register("brightness", lambda options, ctx: None, summary="a second brightness")


def test_ff_show_of_a_contested_name_shows_the_kept_one_and_warns(cli, make_state) -> None:
    state = make_state((Shiny(), "flowfactory-shiny", "1"), strict=False)
    result = cli("show", "reward", "brightness", state=state, strict=False)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"brightness (reward) from flowfactory {flowfactory.__version__}\n")
    assert (f"Warning: reward 'brightness' is registered by more than one package: flowfactory "
            f"{flowfactory.__version__} and flowfactory-shiny 1.") in result.stderr
    assert "Shown: the one kept, the first loaded." in result.stderr
