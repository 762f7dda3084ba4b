"""provenance.json: packages, libraries, git state, devices and config; a resume appends its own record."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from flowfactory.train import provenance

ROOT = Path(__file__).resolve().parents[2]


class FakeAccelerator:
    num_processes = 1
    mixed_precision = "no"
    device = "cpu"

    class distributed_type:  # stands in for accelerate's enum member
        value = "NO"


def git(path: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_packages_are_flowfactory_ones_with_their_versions() -> None:
    found = provenance.flowfactory_packages()
    assert found["flowfactory"] == metadata.version("flowfactory")
    assert found["flowfactory-cli"] == metadata.version("flowfactory-cli")
    plugins = {ep.dist.metadata["Name"] for ep in metadata.entry_points(group="flowfactory") if ep.dist is not None}
    assert set(found) == plugins | {"flowfactory", "flowfactory-cli"}  # every plugin package, nothing else
    assert "torch" not in found and list(found) == sorted(found)


def test_library_versions_name_missing_ones_none() -> None:
    versions = provenance.library_versions(("torch", "no-such-package-xyz"))
    assert versions == {"torch": metadata.version("torch"), "no-such-package-xyz": None}


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_state_of_a_checkout_clean_dirty_and_none(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.txt").write_text("one\n")
    git(repo, "add", "a.txt")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    (repo / "sub").mkdir()
    state = provenance.git_state(repo / "sub")
    assert state == {"commit": git(repo, "rev-parse", "HEAD"), "dirty": False, "root": str(repo.resolve())}
    (repo / "untracked.txt").write_text("x")
    assert provenance.git_state(repo)["dirty"] is False  # untracked files do not make a checkout dirty
    (repo / "a.txt").write_text("two\n")
    assert provenance.git_state(repo)["dirty"] is True
    outside = tmp_path / "plain"
    outside.mkdir()
    assert provenance.git_state(outside) is None


def test_write_records_everything_and_a_resume_appends(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["ff", "run", "x.yaml"])
    config = {"name": "p", "train": {"epochs": 3}}
    provenance.write(tmp_path, config, FakeAccelerator())
    data = json.loads((tmp_path / "provenance.json").read_text())
    assert data["config"] == config and data["command"] == ["ff", "run", "x.yaml"]
    assert data["packages"] == provenance.flowfactory_packages()
    assert set(data["libraries"]) >= {"torch", "diffusers", "transformers", "accelerate", "peft"}
    assert data["libraries"]["torch"] == metadata.version("torch")
    assert data["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert data["devices"]["processes"] == 1 and data["devices"]["device"] == "cpu"
    if (ROOT / ".git").exists() and shutil.which("git"):  # the tests run from the project's checkout
        assert data["git"]["commit"] == git(ROOT, "rev-parse", "HEAD")
        assert isinstance(data["git"]["dirty"], bool)
    assert "resumes" not in data
    provenance.write(tmp_path, {"name": "p", "train": {"epochs": 5}}, FakeAccelerator(), resumed_from=3)
    again = json.loads((tmp_path / "provenance.json").read_text())
    assert again["config"] == config and again["created"] == data["created"]  # the first record stays
    assert [r["from_epoch"] for r in again["resumes"]] == [3]
    assert again["resumes"][0]["config"]["train"]["epochs"] == 5  # a resume may raise train.epochs
    assert again["resumes"][0]["packages"] == data["packages"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["provenance.json"]
