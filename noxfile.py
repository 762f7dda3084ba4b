"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s core` (core alone, no plugin installed)."""

import nox

nox.options.sessions = ["lint", "core", "tests"]
TORCH = "torch==2.13.0"  # the CPU build; other specs pull a multi-GB CUDA build


@nox.session
def tests(session: nox.Session) -> None:
    """Every package installed, every test."""
    session.install("-r", "requirements.txt")
    session.run("pytest", *session.posargs, env={"FLOWFACTORY_STRICT_PLUGINS": "1"})


@nox.session
def core(session: nox.Session) -> None:
    """The core and its CLI with no plugin installed: the core must not need any."""
    session.install(TORCH, "-e", "./core[tensorboard]", "-e", "./cli", "pytest")
    session.run("pytest", "tests/core", "tests/cli", *session.posargs, env={"FLOWFACTORY_STRICT_PLUGINS": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "core", "cli", "plugins", "tests", "benchmarks", "noxfile.py")
