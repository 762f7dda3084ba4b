"""Fixtures for `ff` tests: run the CLI in-process against a controlled plugin state.

The seam: `flowfactory_cli.main.create_app(state)` builds the app bound to the given plugin state, so no
installed plugin package influences these tests (`plugin_state` is the built-ins plus the inline test
components of tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from click.testing import Result
from typer.testing import CliRunner

from flowfactory.plugins import PluginState
from flowfactory_cli.main import create_app


@pytest.fixture
def cli(plugin_state: PluginState) -> Callable[..., Result]:
    """`cli("list", "--json", state=...)`: invoke `ff` on a wide terminal; exceptions other than exits raise."""

    def invoke(*args: str, state: PluginState | None = None, strict: bool = True) -> Result:
        app = create_app(state if state is not None else plugin_state, strict=strict)
        return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"}, catch_exceptions=False)

    return invoke


def _assert_user_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ")
    assert result.stderr.count("Error:") == 1
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


@pytest.fixture
def user_error() -> Callable[..., None]:
    """`user_error(result, *fragments)`: exit code 2, one `Error:` message on stderr holding every fragment,
    nothing on stdout, no traceback."""
    return _assert_user_error
