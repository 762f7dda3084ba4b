"""Servers shared by the tests of flowfactory-rewards-remote, each started once (session scope) as a real
subprocess on a free port: `ff reward serve` for colour-match (bearer token, 1 MiB request limit), brightness (no
token), edit-colour (reads the records' input images; 1 MiB limit, its own TMPDIR) and the groupwise `group-centred`
test reward, and the fake OpenAI-compatible and Flow-GRPO servers."""

from __future__ import annotations

import pytest
from remote_constants import TOKEN, TOKEN_ENV
from remote_serving import ENV, FF_EXTRA, fake, serving


@pytest.fixture(scope="session")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def colour_server(logs):
    """colour-match (tolerance 0.5) behind a bearer token read from FF_TEST_REWARD_TOKEN, requests up to 1 MiB."""
    with serving("--reward", "colour-match", "--set", "tolerance=0.5", "--token-env", TOKEN_ENV,
                 "--max-request-mb", "1", log=logs / "colour.log", env={**ENV, TOKEN_ENV: TOKEN}) as server:
        yield server


@pytest.fixture(scope="session")
def brightness_server(logs):
    with serving("--reward", "brightness", log=logs / "brightness.log") as server:
        yield server


@pytest.fixture(scope="session")
def edit_server(logs, tmp_path_factory):
    """edit-colour (tolerance 0.5), requests up to 1 MiB; `server.tmp` is its TMPDIR, where each request's input
    images are written and removed."""
    tmp = tmp_path_factory.mktemp("edit-server-tmp")
    with serving("--reward", "edit-colour", "--set", "tolerance=0.5", "--max-request-mb", "1",
                 log=logs / "edit.log", env={**ENV, "TMPDIR": str(tmp)}) as server:
        server.tmp = tmp
        yield server


@pytest.fixture(scope="session")
def group_server(logs):
    with serving("--reward", "group-centred", log=logs / "group.log", launcher=FF_EXTRA) as server:
        yield server


@pytest.fixture(scope="session")
def openai_server(logs):
    with fake("openai", logs / "openai.log", env={**ENV, "FAKE_API_KEY": "sk-fake"}) as server:
        yield server


@pytest.fixture(scope="session")
def flowgrpo_server(logs, tmp_path_factory):
    marker = tmp_path_factory.mktemp("marker") / "pwned"
    with fake("flowgrpo", logs / "flowgrpo.log", env={**ENV, "FAKE_MARKER": str(marker)}) as server:
        server.marker = marker
        yield server


@pytest.fixture
def token_env(monkeypatch):
    """The token in this process's environment, as a run on the client side would have it."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return TOKEN_ENV


@pytest.fixture(scope="session")
def registry():
    import flowfactory.plugins as ff_plugins

    return ff_plugins.load(strict=True).registry


