"""The docs site builds with `mkdocs build --strict` (a broken link, a missing page or an API reference that cannot
be generated fails it), and its API reference holds the public modules' documented names."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# the environment's own mkdocs first (a venv not activated), else one on PATH
MKDOCS = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")


@pytest.mark.skipif(MKDOCS is None,
                    reason="mkdocs is not installed (requirements.txt installs mkdocs-material and mkdocstrings)")
def test_docs_site_builds_strict_with_the_api_reference(tmp_path: Path) -> None:
    site = tmp_path / "site"
    result = subprocess.run([MKDOCS, "build", "--strict", "-d", str(site)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    pages = {p.parent.name for p in site.glob("*/index.html")}
    assert {"architecture", "config", "hooks"} <= pages
    reference = {name: (site / "api" / name / "index.html").read_text()
                 for name in ("types", "hookspecs", "testing", "algorithms")}
    assert 'id="flowfactory.types.Policy.velocity"' in reference["types"]
    assert 'id="flowfactory.hookspecs.register_policies"' in reference["hookspecs"]
    assert 'id="flowfactory.testing.contracts.PolicyContract"' in reference["testing"]
    assert 'id="flowfactory.algorithms.clipped_surrogate"' in reference["algorithms"]
