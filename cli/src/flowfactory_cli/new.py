"""`ff new KIND NAME`: write a complete, installable plugin package for one component.

The package is rendered from the templates in `flowfactory_cli/templates/<kind>/` (package data) with
`string.Template`: `$name` (the component name), `$dist` (the distribution, `flowfactory-<name>`), `$module`
(its import name, `flowfactory_<name>` with `_` for `-`), `${Class}` (the CamelCase name) and `$core_version`.
Each kind writes a pyproject with the `flowfactory` entry point, an entry-point module (options model and
registration; no torch), the component in its own module (imported by `build`), a README with an options
table and a test that subclasses the kind's contract suite. As generated, `pip install -e .` installs it and
`python -m pytest` passes; docs/tutorials/ walks through each file.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Annotated

import click
import typer
from rich.markup import escape

from flowfactory.errors import FlowFactoryError
from flowfactory_cli.console import out, print_warning


@dataclass(frozen=True)
class Blueprint:
    """What `ff new` writes for one kind: output path -> template file (both relative)."""

    registry_kind: str  # the kind in the registry (`ff list`): an algorithm is an "optimizer"
    summary: str  # what the generated component is, for the message after generation
    files: tuple[tuple[str, str], ...]


def _files(kind: str, component_module: str, extra: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    return (
        ("pyproject.toml", f"{kind}/pyproject.toml.tmpl"),
        ("README.md", f"{kind}/README.md.tmpl"),
        ("src/$module/__init__.py", f"{kind}/__init__.py.tmpl"),
        (f"src/$module/{component_module}.py", f"{kind}/{component_module}.py.tmpl"),
        *extra,
        ("tests/test_$module.py", f"{kind}/test.py.tmpl"),
    )


BLUEPRINTS: dict[str, Blueprint] = {
    "reward": Blueprint("reward", "a reward that scores decoded images", _files("reward", "reward")),
    "sampler": Blueprint("sampler", "an SDE sampler with Gaussian log-probs", _files("sampler", "sampler")),
    "policy": Blueprint("policy", "a diffusers model plugin (StableDiffusion3Pipeline) with a tiny preset",
                        _files("policy", "policy", (("src/$module/tiny.py", "policy/tiny.py.tmpl"),))),
    "algorithm": Blueprint("optimizer", "an RL algorithm (REINFORCE on the SDE steps' log-probs)",
                           _files("algorithm", "loss")),
}
KIND_ALIASES = {**{k: k for k in BLUEPRINTS}, "model": "policy", "optimizer": "algorithm"}
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]*")


def template_root() -> Path:
    """The folder holding the templates (package data of flowfactory-cli)."""
    return Path(str(resources.files("flowfactory_cli") / "templates"))


def normalise_kind(kind: str) -> str:
    try:
        return KIND_ALIASES[kind.lower()]
    except KeyError:
        raise FlowFactoryError(f"`ff new` makes one of {', '.join(BLUEPRINTS)}, not {kind!r}. "
                               "Example: `ff new reward redness`.") from None


def check_name(name: str) -> str:
    """The import-name part of `name` (`-` as `_`); raises FlowFactoryError unless that is a valid, lowercase,
    non-keyword Python identifier."""
    ident = name.replace("-", "_")
    if not (NAME_PATTERN.fullmatch(name) and ident.isidentifier() and not keyword.iskeyword(ident)
            and not ident.endswith("_") and "__" not in ident):
        raise FlowFactoryError(
            f"component name {name!r} is not usable: it must start with a lowercase letter and hold only lowercase "
            "letters, digits, '-' and '_' (single, not at the end), so that with '_' for '-' it is a Python "
            "identifier (the package's import name). Example: `ff new reward my-reward`.")
    return ident


def variables(name: str) -> dict[str, str]:
    """The template variables for component `name`."""
    from flowfactory import __version__ as core_version

    ident = check_name(name)
    return {
        "name": name,
        "ident": ident,
        "dist": f"flowfactory-{name.replace('_', '-')}",
        "module": f"flowfactory_{ident}",
        "Class": "".join(part.capitalize() for part in ident.split("_")),
        "core_version": core_version,
    }


def render(kind: str, name: str) -> dict[str, str]:
    """The generated package for `kind` and `name`: relative path -> file text (nothing is written)."""
    blueprint = BLUEPRINTS[normalise_kind(kind)]
    values = variables(name)
    root = template_root()
    return {Template(path).substitute(values): Template((root / template).read_text()).substitute(values)
            for path, template in blueprint.files}


def write(kind: str, name: str, directory: Path | None = None) -> tuple[Path, list[str]]:
    """Render `kind`/`name` into `directory` (default: ./flowfactory-<name>), which must be absent or empty.
    Returns the folder and the relative paths written."""
    files = render(kind, name)
    folder = Path(directory) if directory is not None else Path.cwd() / variables(name)["dist"]
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        what = "a file" if not folder.is_dir() else "a folder that is not empty"
        raise FlowFactoryError(f"{folder} is {what}; `ff new` writes only into a new or empty folder. "
                               "Pick another with --dir PATH.")
    for rel, text in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder, list(files)


def _installed_owner(ctx: click.Context, registry_kind: str, name: str) -> str | None:
    """The package of an installed component of this kind and name, if any (a broken plugin state: None)."""
    import flowfactory.plugins as ff_plugins

    state = ctx.find_object(ff_plugins.PluginState) or ff_plugins.get_state()
    if name not in state.registry.names(registry_kind):
        return None
    try:
        return state.registry.get(registry_kind, name).package
    except FlowFactoryError:  # registered by two packages already
        return "more than one package"


def new(
    ctx: typer.Context,
    kind: Annotated[str, typer.Argument(metavar="KIND", help=f"What to make: {', '.join(BLUEPRINTS)}.",
                                        show_default=False)],
    name: Annotated[str, typer.Argument(metavar="NAME", help="The component's name in configs, e.g. my-reward; "
                                        "the package is flowfactory-NAME, its module flowfactory_NAME.",
                                        show_default=False)],
    directory: Annotated[Path | None, typer.Option(
        "--dir", metavar="PATH", help="Folder to create (new or empty). Default: ./flowfactory-NAME.",
        show_default=False)] = None,
) -> None:
    """Create a plugin package: a reward, sampler, policy (diffusers model) or algorithm, with its pyproject,
    options, README and contract tests; `pip install -e` it and its tests pass."""
    kind = normalise_kind(kind)
    blueprint = BLUEPRINTS[kind]
    check_name(name)
    owner = _installed_owner(ctx, blueprint.registry_kind, name)
    if owner is not None:
        print_warning(f"a {blueprint.registry_kind} named {name!r} is already installed (package {owner}); two "
                      f"packages registering the same name is an error, so installing this one beside it will "
                      f"fail to load. Rename one of them.")
    folder, written = write(kind, name, directory)
    values = variables(name)
    console = out()
    console.print(f"Created [bold]{escape(str(folder))}[/]: {blueprint.summary}, "
                  f"{blueprint.registry_kind} [bold]{escape(name)}[/] in package {values['dist']}.")
    for rel in written:
        console.print(f"  {escape(rel)}")
    console.print("Next:\n"
                  f"  cd {escape(str(folder))}\n"
                  "  pip install -e .          # registers the entry point\n"
                  f"  ff list {blueprint.registry_kind}\n"
                  "  python -m pytest          # the contract suite", soft_wrap=True)
