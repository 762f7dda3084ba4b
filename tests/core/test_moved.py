"""The deprecated import paths of the diffusers half that moved out of core to flowfactory-diffusers: each is the
new module itself, with a DeprecationWarning naming the new import, or, without the package, an ImportError that
says what to install. Core imports none of them."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import flowfactory

ALIASES = {
    "flowfactory.policies.diffusers": "flowfactory_diffusers.policy",
    "flowfactory.policies.options": "flowfactory_diffusers.options",
    "flowfactory.policies.plan": "flowfactory_diffusers.plan",
    "flowfactory.testing.diffusers": "flowfactory_diffusers.testing",
    "flowfactory.testing.tokenizers": "flowfactory_diffusers.tokenizers",
}


@pytest.mark.parametrize("old", sorted(ALIASES))
@pytest.mark.filterwarnings("ignore:flowfactory.policies moved to flowfactory_diffusers ")  # the parent package's
def test_alias_is_the_new_module_with_a_warning_naming_it(old, monkeypatch):
    pytest.importorskip("flowfactory_diffusers")
    new = importlib.import_module(ALIASES[old])
    for name in [m for m in sys.modules if m == old or m.startswith("flowfactory.policies")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to {ALIASES[old]} \(package flowfactory-diffusers\)"):
        module = importlib.import_module(old)
    assert module is new


def test_policies_package_and_suite_name_still_resolve(monkeypatch):
    fd = pytest.importorskip("flowfactory_diffusers")
    monkeypatch.delitem(sys.modules, "flowfactory.policies", raising=False)
    with pytest.warns(DeprecationWarning, match="import flowfactory_diffusers instead"):
        from flowfactory.policies import quiet_transformers
    assert quiet_transformers is fd.quiet_transformers
    import flowfactory.testing as testing

    monkeypatch.delitem(testing.__dict__, "DiffusersPolicyContract", raising=False)
    with pytest.warns(DeprecationWarning, match="import flowfactory_diffusers.testing instead"):
        suite = testing.DiffusersPolicyContract
    assert suite is importlib.import_module("flowfactory_diffusers.testing").DiffusersPolicyContract


BLOCKED = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "flowfactory_diffusers":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
import importlib
for old in sys.argv[1:]:
    try:
        importlib.import_module(old)
    except ImportError as exc:
        print(old, "|", exc)
"""


def test_without_the_package_the_alias_says_what_to_install():
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", BLOCKED, *sorted(ALIASES)], capture_output=True,
                         text=True, timeout=120, check=True).stdout.splitlines()
    assert len(out) == len(ALIASES), out
    for line in out:
        assert "pip install flowfactory-diffusers" in line, line


def test_core_imports_no_alias_and_no_diffusers_module():
    core = Path(flowfactory.__file__).parent
    offenders = []
    for path in sorted(core.rglob("*.py")):
        rel = path.relative_to(core).as_posix()
        if rel.startswith("policies/") or rel in ("testing/diffusers.py", "testing/tokenizers.py", "_moved.py"):
            continue
        text = path.read_text()
        for needle in ("flowfactory_diffusers", "flowfactory.policies", "testing.diffusers", "testing.tokenizers",
                       "import diffusers", "from diffusers", "import peft", "from peft"):
            if needle in text and not (rel == "testing/__init__.py" and needle == "flowfactory_diffusers"):
                offenders.append((rel, needle))
    assert offenders == []
