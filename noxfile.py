"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s core` (core alone, no plugin installed), `nox -s docs`
(the docs site, built with --strict into site/), `nox -s wheels` (the packages' wheels and sdists built, installed in a
clean venv the README's way, and run)."""

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
    session.install(TORCH, "-e", "./core[tensorboard,plot,wandb]", "-e", "./cli", "pytest", "pytest-xdist")
    session.run("pytest", "tests/core", "tests/cli", *session.posargs, env={"FLOWFACTORY_STRICT_PLUGINS": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "core", "cli", "plugins", "tests", "benchmarks", "noxfile.py")


@nox.session
def docs(session: nox.Session) -> None:
    """mkdocs (material) over docs/, with the API reference from the docstrings (mkdocstrings reads the sources, so
    nothing needs installing but the tools); --strict turns every warning, such as a broken link, into a failure."""
    session.install("mkdocs-material>=9.5", "mkdocstrings[python]>=0.26", "ruff")  # ruff: formats the signatures
    session.run("mkdocs", "build", "--strict", "-d", "site", *session.posargs)


@nox.session
def wheels(session: nox.Session) -> None:
    """tests/packaging: build core, cli, diffusers, flux and grpo (wheel and sdist), check each holds its package's files, then
    `pip install --find-links DIST flowfactory-cli flowfactory-flux flowfactory-grpo` into a clean venv and run
    `ff --version`, `ff list` and a 2-epoch quickstart there. Needs only pytest and build here (--noconftest: the
    shared conftest imports flowfactory, which this session does not install)."""
    session.install("pytest>=8", "pytest-xdist>=3.5", "build>=1.0", "setuptools>=77")
    session.run("pytest", "tests/packaging", "--noconftest", "-p", "no:cacheprovider", *session.posargs)
