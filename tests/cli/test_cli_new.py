"""`ff new KIND NAME`: the generated packages install with `pip install -e` and their own tests pass.

The end-to-end tests generate each kind into a temporary folder, `pip install --no-deps --no-build-isolation
--target SITE -e` it (so the shared venv is not modified), and run, in subprocesses with SITE (and the source
folder its editable .pth names) on PYTHONPATH: `ff list KIND --json`, an import of the entry-point module that
must not import torch, and the package's own pytest suite (the contract suites). The names are read from
the tutorials' `ff new` lines (docs/tutorials/), so what the tutorials show is what is installed and tested.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flowfactory_cli import new as ff_new

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TUTORIALS = {"reward": "reward.md", "sampler": "sampler.md", "algorithm": "algorithm.md", "policy": "model.md"}


def tutorial_name(kind: str) -> str:
    """The NAME of the `ff new KIND NAME` line in docs/tutorials/ for this kind: the package installed here."""
    text = (ROOT / "docs" / "tutorials" / TUTORIALS[kind]).read_text()
    m = re.search(rf"^ff new {kind} ([\w-]+)$", text, flags=re.M)
    assert m, f"docs/tutorials/{TUTORIALS[kind]} has no `ff new {kind} NAME` line"
    return m.group(1)


# --- generation, names and folders ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(ff_new.BLUEPRINTS))
def test_new_writes_an_installable_package(cli, tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "pkg"
    result = cli("new", kind, "my-thing", "--dir", str(folder))
    assert result.exit_code == 0, result.output
    module = "flowfactory_my_thing"
    written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert written == sorted(ff_new.render(kind, "my-thing"))
    for rel in written:
        assert rel in result.stdout
    assert f"src/{module}/__init__.py" in written and f"tests/test_{module}.py" in written
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((folder / "pyproject.toml").read_text())
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
    assert project["project"]["name"] == "flowfactory-my-thing"
    assert project["project"]["entry-points"]["flowfactory"] == {"my_thing": module}
    assert any(d.startswith("flowfactory") for d in project["project"]["dependencies"])
    entry = (folder / "src" / module / "__init__.py").read_text()
    assert "@hookimpl" in entry and '"my-thing"' in entry
    assert not re.search(r"^(import|from) (torch|diffusers|transformers)\b", entry, flags=re.M), (
        "the entry-point module imports torch at its top")
    suite = {"reward": "RewardContract", "sampler": "SamplerContract", "algorithm": "OptimizerContract",
             "policy": "DiffusersPolicyContract"}[kind]
    assert re.search(rf"^class Test\w+\({suite}\):", (folder / f"tests/test_{module}.py").read_text(), flags=re.M)
    assert "| key | default | meaning |" in (folder / "README.md").read_text()
    assert "cd " in result.stdout and "pip install -e ." in result.stdout


def test_new_defaults_to_flowfactory_name_in_the_working_directory(cli, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli("new", "reward", "shiny")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "flowfactory-shiny" / "src" / "flowfactory_shiny" / "reward.py").is_file()


def test_kind_aliases_and_unknown_kinds(cli, user_error, tmp_path: Path) -> None:
    assert cli("new", "optimizer", "a1", "--dir", str(tmp_path / "a")).exit_code == 0
    assert (tmp_path / "a" / "src" / "flowfactory_a1" / "loss.py").is_file()
    assert cli("new", "model", "m1", "--dir", str(tmp_path / "m")).exit_code == 0
    assert (tmp_path / "m" / "src" / "flowfactory_m1" / "tiny.py").is_file()
    user_error(cli("new", "dataset", "x", "--dir", str(tmp_path / "d")), "reward, sampler, policy, algorithm",
               "'dataset'")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("name", ["3d", "My-Reward", "with space", "class", "a--b", "end-", "a.b", "é", "_x"])
def test_names_that_are_not_identifiers_are_refused(cli, user_error, tmp_path: Path, name: str) -> None:
    user_error(cli("new", "reward", name, "--dir", str(tmp_path / "out")), repr(name), "identifier")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["a", "redness", "my-reward", "my_reward", "x2-y3"])
def test_valid_names(name: str) -> None:
    values = ff_new.variables(name)
    assert values["module"].isidentifier() and values["Class"].isidentifier()
    assert values["dist"] == "flowfactory-" + name.replace("_", "-")


def test_a_folder_that_is_not_empty_is_refused(cli, user_error, tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    user_error(cli("new", "reward", "shiny", "--dir", str(tmp_path)), str(tmp_path), "not empty", "--dir")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    a_file = tmp_path / "keep.txt"
    user_error(cli("new", "reward", "shiny", "--dir", str(a_file)), "is a file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("new", "reward", "shiny", "--dir", str(empty)).exit_code == 0
    assert (empty / "pyproject.toml").is_file()


def test_a_name_an_installed_component_has_is_a_warning(cli, tmp_path: Path) -> None:
    result = cli("new", "reward", "brightness", "--dir", str(tmp_path / "b"))
    assert result.exit_code == 0, result.output
    assert "Warning" in result.stderr and "'brightness' is already installed (package flowfactory)" in result.stderr
    assert (tmp_path / "b" / "pyproject.toml").is_file()
    other_kind = cli("new", "sampler", "brightness", "--dir", str(tmp_path / "s"))  # names are per kind
    assert other_kind.exit_code == 0 and "already installed" not in other_kind.stderr
    optimizer = cli("new", "algorithm", "fake-opt", "--dir", str(tmp_path / "o"))
    assert "optimizer named 'fake-opt' is already installed (package test-plugins)" in optimizer.stderr


def test_generated_code_passes_ruff(tmp_path: Path) -> None:
    for kind in ff_new.BLUEPRINTS:
        ff_new.write(kind, "a-rather-long-component-name", tmp_path / kind)
    out = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", "."], cwd=tmp_path, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_templates_are_package_data() -> None:
    """Every template is matched by flowfactory-cli's package-data globs, so a wheel ships them."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((ROOT / "cli" / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    root = ff_new.template_root()
    files = [p.relative_to(root.parent).as_posix() for p in root.rglob("*") if p.is_file()]
    used = {template for b in ff_new.BLUEPRINTS.values() for _, template in b.files}
    assert sorted(p.removeprefix("templates/") for p in files) == sorted(used), "unused or missing templates"
    for f in files:
        assert any(fnmatch.fnmatch(f, g) for g in data["flowfactory_cli"]), f


def test_help_lists_new(cli) -> None:
    result = cli("new", "--help")
    assert result.exit_code == 0 and "reward, sampler, policy, algorithm" in result.stdout
    assert "--dir" in result.stdout


# --- end to end: install and run the generated tests ---------------------------------------------------------

def install(kind: str, name: str, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """`ff new KIND NAME`, then `pip install -e` into tmp_path/site; returns the package folder and the
    environment (PYTHONPATH: site and what its editable .pth files add) to run it in."""
    folder, site = tmp_path / f"flowfactory-{name}", tmp_path / "site"
    ff_new.write(kind, name, folder)
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--disable-pip-version-check", "--no-input", "--target", str(site), "-e", str(folder)],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert list(site.glob(f"flowfactory_{name.replace('-', '_')}-0.1.0.dist-info/entry_points.txt"))
    added = [line.strip() for pth in site.glob("*.pth") for line in pth.read_text().splitlines()
             if line.strip() and not line.startswith(("#", "import"))]
    assert added, "the editable install wrote no .pth path"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *added]), "FLOWFACTORY_STRICT_PLUGINS": "1",
           "COLUMNS": "200"}
    return folder, env


CHECK = """
import json, sys
import {module}
heavy = [m for m in ("torch", "diffusers", "transformers", "peft") if m in sys.modules]
options = {module}.{options}
print(json.dumps({{"heavy": heavy, "fields": sorted(options.model_fields)}}))
"""


def run_generated(kind: str, name: str, tmp_path: Path) -> str:
    folder, env = install(kind, name, tmp_path)
    values = ff_new.variables(name)
    registry_kind = ff_new.BLUEPRINTS[kind].registry_kind
    listed = subprocess.run([sys.executable, "-m", "flowfactory_cli", "list", registry_kind, "--json"],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    mine = [r for r in json.loads(listed.stdout) if r["name"] == name]
    assert [(r["kind"], r["package"], r["version"]) for r in mine] == [(registry_kind, values["dist"], "0.1.0")]

    check = subprocess.run([sys.executable, "-c", CHECK.format(module=values["module"],
                                                               options=f"{values['Class']}Options")],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    facts = json.loads(check.stdout)
    assert facts["heavy"] == [], f"importing the entry-point module imports {facts['heavy']}"
    readme = (folder / "README.md").read_text()
    documented = {k for row in re.findall(r"^\| `([\w.]+)`(?:, `([\w.]+)`)? \|", readme, flags=re.M) for k in row if k}
    assert set(facts["fields"]) <= documented, "the README's options table misses an option"

    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
                            "ignore::DeprecationWarning"], capture_output=True, text=True, env=env, cwd=folder)
    assert tests.returncode == 0, tests.stdout[-6000:] + tests.stderr[-3000:]
    return tests.stdout


def passed(stdout: str) -> int:
    m = re.search(r"(\d+) passed", stdout)
    assert m and not re.search(r"\d+ (failed|error)", stdout), stdout[-3000:]
    return int(m.group(1))


def test_generated_reward_installs_and_passes_its_tests(tmp_path: Path) -> None:
    assert passed(run_generated("reward", tutorial_name("reward"), tmp_path)) >= 6


def test_generated_sampler_installs_and_passes_its_tests(tmp_path: Path) -> None:
    assert passed(run_generated("sampler", tutorial_name("sampler"), tmp_path)) >= 13


def test_generated_algorithm_installs_and_passes_its_tests(tmp_path: Path) -> None:
    assert passed(run_generated("algorithm", tutorial_name("algorithm"), tmp_path)) >= 7


@pytest.mark.slow  # the diffusers suite: ~80 s on 2 shared cores
def test_generated_policy_installs_and_passes_its_tests(tmp_path: Path) -> None:
    assert passed(run_generated("policy", tutorial_name("policy"), tmp_path)) >= 30
