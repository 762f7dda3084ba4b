"""The README's examples run as written: its plugin (three files under "## Write a plugin") installs with pip,
`ff list reward` shows the line the README shows, and its contract test passes; and its `ff list` block is
what `ff list` prints, piped, at 200 columns (regenerate it with `COLUMNS=200 ff list | sed 's/ *$//'`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIST_COLUMNS = "200"  # the width the README's `ff list` block was printed at


def section(heading: str) -> str:
    """The README's text from `heading` to the next `## ` heading."""
    text = (ROOT / "README.md").read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def table_rows(lines: list[str]) -> list[list[str]]:
    """The cells of each row of a rich table (┃ in the header, │ in the body), stripped."""
    return [[c.strip() for c in re.split(r"[│┃]", line)] for line in lines if re.search(r"[│┃]", line)]


def ff(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "flowfactory_cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": LIST_COLUMNS, **(env or {})}, cwd=cwd, timeout=120)
    assert proc.returncode == 0, f"ff {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_readme_ff_list_block_is_ff_list_output() -> None:
    blocks = [body for lang, body in code_blocks(section("## Components")) if body.startswith("$ ff list\n")]
    assert len(blocks) == 1, "README.md's Components section should show one `$ ff list` block"
    shown = blocks[0].splitlines()[1:]
    real = [line.rstrip() for line in ff("list").splitlines()]
    shown_rows, real_rows = table_rows(shown), table_rows(real)
    assert shown_rows[0] == real_rows[0] == ["kind", "name", "package", "version", "summary"], "header"
    shown_by_key = {tuple(r[:2]): r for r in shown_rows[1:]}
    real_by_key = {tuple(r[:2]): r for r in real_rows[1:]}
    assert sorted(real_by_key.keys() - shown_by_key.keys()) == [], "components missing from the README block"
    assert sorted(shown_by_key.keys() - real_by_key.keys()) == [], "README block lists components not installed"
    for key, real_row in real_by_key.items():
        kind, name, package, version, summary = shown_by_key[key]
        assert [kind, name, package, version] == real_row[:4], f"README's `ff list` row {key}"
        assert real_row[4].startswith(summary) and summary, f"README's summary of {key} is not `ff list`'s"
    assert [r[:2] for r in shown_rows] == [r[:2] for r in real_rows], "README's `ff list` rows are out of order"
    assert shown == real, f"README's `ff list` block differs from `COLUMNS={LIST_COLUMNS} ff list` (spacing)"


@pytest.fixture(scope="module")
def readme_plugin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[tuple[str, str]]]:
    """The README's plugin files written where their first lines say, installed (non-editable, no deps)
    into a folder of its own: (source folder, install folder, the section's blocks)."""
    blocks = code_blocks(section("## Write a plugin"))
    files = [(lang, body) for lang, body in blocks if lang in ("python", "toml")]
    assert [lang for lang, _ in files] == ["python", "toml", "python"], "module, pyproject.toml, test"
    src = tmp_path_factory.mktemp("my-reward")
    for _, body in files:
        first = body.splitlines()[0]
        assert first.startswith("# "), f"a README plugin block must start with its file name: {first!r}"
        path = src / first[2:].strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                           "--no-index", "--quiet", "--target", str(target), "."],
                          cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip install of the README's plugin failed:\n{proc.stdout}\n{proc.stderr}"
    return src, target, blocks


def test_readme_plugin_is_listed_as_the_readme_shows(readme_plugin) -> None:
    src, target, blocks = readme_plugin
    shown = [body for lang, body in blocks if body.startswith("$ ff list reward")]
    assert len(shown) == 1, "the plugin section should show one `$ ff list reward` block"
    expected = table_rows(shown[0].splitlines()[1:])
    out = ff("list", "reward", env={"PYTHONPATH": str(target)}, cwd=target.parent)
    rows = [r for r in table_rows(out.splitlines()) if r[1] == "redness"]
    assert rows == expected == [["reward", "redness", "my-reward", "0.1.0",
                                 "How much redder than green/blue the image is."]], out
    real_line = [line.rstrip() for line in out.splitlines() if "│ redness " in line]
    assert shown[0].splitlines()[1:] == real_line, "the README's `ff list reward` line differs in spacing"
    assert "torch" not in (target / "my_reward" / "__init__.py").read_text().split("class Redness")[0], (
        "the README's module must not import torch at its top")


def test_readme_plugin_passes_its_contract_test(readme_plugin) -> None:
    src, target, _ = readme_plugin
    tests = src / "tests"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                          cwd=tests, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(target), "FLOWFACTORY_STRICT_PLUGINS": "1"})
    assert proc.returncode == 0, f"the README's contract test failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
    assert re.search(r"\b[1-9]\d* passed", proc.stdout), proc.stdout
