"""docs/tutorials/ stay true: each starts with `ff new KIND NAME` and shows every generated file, verbatim.

For each tutorial, the `ff new` line of its first bash block is rendered with `flowfactory_cli.new` and every
section headed "### `path`" must hold, in its first code block, exactly that generated file; every generated
file must be shown. tests/cli/test_cli_new.py installs the same packages (it reads these `ff new` lines) and
runs their tests, so what the tutorials show installs and passes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flowfactory_cli import new as ff_new

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = ROOT / "docs" / "tutorials"
KINDS = {"reward.md": "reward", "sampler.md": "sampler", "model.md": "policy", "algorithm.md": "algorithm"}
FENCE = re.compile(r"^(`{3,})(\w*)\n(.*?)^\1\n", flags=re.M | re.S)


def ff_new_command(text: str) -> tuple[str, str]:
    """(kind, name) of the `ff new KIND NAME` line in the tutorial's first bash block."""
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert block, "the tutorial has no bash block"
    line = re.search(r"^ff new (\w+) ([\w-]+)$", block.group(1), flags=re.M)
    assert line, "the first bash block has no `ff new KIND NAME` line"
    return line.group(1), line.group(2)


def shown_files(text: str) -> dict[str, str]:
    """path -> the first code block after each "### `path`" heading."""
    shown: dict[str, str] = {}
    headings = list(re.finditer(r"^### `([^`]+)`\n", text, flags=re.M))
    for i, heading in enumerate(headings):
        end = headings[i + 1].start() if i + 1 < len(headings) else len(text)
        block = FENCE.search(text, heading.end(), end)
        assert block, f"section {heading.group(1)} has no code block"
        shown[heading.group(1)] = block.group(3)
    return shown


def test_there_is_a_tutorial_per_kind() -> None:
    assert sorted(p.name for p in TUTORIALS.glob("*.md")) == sorted(KINDS)
    assert sorted(KINDS.values()) == sorted(ff_new.BLUEPRINTS)


@pytest.mark.parametrize("page", sorted(KINDS))
def test_tutorial_shows_exactly_what_ff_new_writes(page: str) -> None:
    text = (TUTORIALS / page).read_text()
    kind, name = ff_new_command(text)
    assert kind == KINDS[page]
    generated = ff_new.render(kind, name)
    shown = shown_files(text)
    assert sorted(shown) == sorted(generated), "the tutorial must show every generated file, and only those"
    for path, content in generated.items():
        assert shown[path] == content, (
            f"docs/tutorials/{page}: the block under `{path}` differs from what `ff new {kind} {name}` writes; "
            "paste the generated file")


@pytest.mark.parametrize("page", sorted(KINDS))
def test_tutorial_installs_and_tests_the_package(page: str) -> None:
    """The commands after generation are the ones tests/cli/test_cli_new.py runs: cd into the package,
    pip install -e it, list the component, run its tests."""
    text = (TUTORIALS / page).read_text()
    kind, name = ff_new_command(text)
    values = ff_new.variables(name)
    commands = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
                for line in block.splitlines()]
    registry_kind = ff_new.BLUEPRINTS[kind].registry_kind
    assert commands[:2] == [f"ff new {kind} {name}", f"cd {values['dist']}"]
    for expected in ("pip install -e .", f"ff list {registry_kind}", "python -m pytest"):
        assert expected in commands, expected


def test_sampler_tutorial_lists_the_contract_rules() -> None:
    """The rules SamplerContract enforces are spelled out, with the names the suite uses."""
    text = (TUTORIALS / "sampler.md").read_text()
    from flowfactory.testing import SamplerContract

    tests = [n for n in dir(SamplerContract) if n.startswith("test_")]
    assert len(tests) >= 10
    for rule in ("float32 `[B, steps]`", "exactly 0 at deterministic", "std of exactly 0", "`ValueError`",
                 'keep="final"', "deterministic=True", "agreement_atol", "bit-identical"):
        assert rule in text, rule


def test_readme_and_hooks_link_the_tutorials() -> None:
    readme = (ROOT / "README.md").read_text()
    hooks = (ROOT / "docs" / "hooks.md").read_text()
    for page in KINDS:
        assert f"docs/tutorials/{page}" in readme, page
        assert f"tutorials/{page}" in hooks, page
    assert "ff new" in readme and "ff new" in hooks
