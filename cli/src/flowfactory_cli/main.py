"""The `ff` application: list and inspect components, validate and run configs.

`create_app(state)` builds a fresh Typer app bound to one plugin state (the process-wide one from
`flowfactory.plugins.get_state()` by default) and lets every plugin add commands through its
`register_commands(app)` hook. Commands read that state from the click context (`ctx.obj`), so tests pass
a state of their own: `create_app(flowfactory.plugins.load(entry_points=False, extra_plugins=[...]))`.

User errors (`FlowFactoryError`) from any command, plugin commands included, print one message on stderr
and exit with code 2. Modules that import torch are imported only inside `ff run`.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from rich.markup import escape
from typer.core import TyperGroup
from typer.main import get_command_name

import flowfactory.plugins as ff_plugins
from flowfactory.errors import FlowFactoryError, PluginError
from flowfactory.registry import KIND_PLURALS, KINDS
from flowfactory_cli import render
from flowfactory_cli.console import err, out, print_error, print_warning
from flowfactory_cli.new import new as new_package

if TYPE_CHECKING:
    from pydantic import BaseModel

    from flowfactory.config import RunConfig
    from flowfactory.plugins import PluginState

USER_ERROR = 2  # exit code of a FlowFactoryError, as for a usage error
INTERRUPTED = 130  # exit code after Ctrl-C, as shells report SIGINT

# What `ff list KIND` accepts: each kind, and its plural.
KIND_ALIASES: dict[str, str] = {**{k: k for k in KINDS}, **{KIND_PLURALS[k]: k for k in KINDS}}


class _Group(TyperGroup):
    """The root command group; turns a FlowFactoryError raised by any subcommand into one message."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FlowFactoryError as exc:
            print_error(str(exc))
            # a stop with its own meaning keeps its code (the reward-hacking guard: 3); docs/failures.md
            raise typer.Exit(getattr(exc, "exit_code", USER_ERROR)) from None


def _state(ctx: click.Context) -> PluginState:
    state = ctx.find_object(ff_plugins.PluginState)
    return state if state is not None else ff_plugins.get_state()


def _note_plugin_failures(state: PluginState) -> None:
    """A broken plugin is skipped, not fatal; say so, since its components are missing from what follows."""
    if state.errors:
        names = ", ".join(sorted({p.package for p in state.errors}))
        n = len(state.errors)
        print_warning(f"{n} plugin{'s' if n != 1 else ''} failed to load ({names}); "
                      "their components are missing. `ff plugins` shows why.")


def _normalise_kind(kind: str) -> str:
    try:
        return KIND_ALIASES[kind.lower()]
    except KeyError:
        raise FlowFactoryError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}. "
                               f"Example: `ff list reward`.") from None


def _complete_kind(incomplete: str) -> list[str]:
    return [k for k in KINDS if k.startswith(incomplete)]


def _complete_name(ctx: typer.Context, incomplete: str) -> list[str]:
    kind = KIND_ALIASES.get(str(ctx.params.get("kind") or "").lower())
    if kind is None:
        return []
    return [n for n in _state(ctx).registry.names(kind) if n.startswith(incomplete)]


def _print_json(data: Any) -> None:
    """JSON on stdout, plain (no rich wrapping or markup), so it can be piped into another program."""
    typer.echo(json.dumps(data, indent=2))


# --- commands ---------------------------------------------------------------------------------------------

def _print_version(value: bool) -> None:
    if not value:
        return
    typer.echo(render.versions_text(render.version_records()))
    raise typer.Exit()


STRICT_KEY = "flowfactory.strict"  # ctx.meta key: whether this app runs in strict plugin mode


def _make_root(strict: bool) -> Any:
    def root(
        ctx: typer.Context,
        version: Annotated[bool, typer.Option(
            "--version", callback=_print_version, is_eager=True,
            help="Show the versions of flowfactory, flowfactory-cli, every installed plugin package, torch and "
                 "diffusers.")] = False,
    ) -> None:
        """Reinforcement learning for flow-matching image and video models.

        `ff list` shows the installed components, `ff run CONFIG` trains.
        """
        ctx.meta[STRICT_KEY] = strict

    return root


def list_components(
    ctx: typer.Context,
    kind: Annotated[str | None, typer.Argument(
        metavar="KIND", help=f"Only this kind: {', '.join(KINDS)}.", autocompletion=_complete_kind,
        show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
) -> None:
    """List installed components: kind, name, package, version and summary."""
    state = _state(ctx)
    kind = _normalise_kind(kind) if kind else None
    records = render.component_records(state.registry.specs(kind))
    _note_plugin_failures(state)
    if as_json:
        _print_json(records)
    elif not records:
        what = KIND_PLURALS[kind] if kind else "components"
        out().print(f"No {what} are installed. Plugin packages add them, e.g. `pip install flowfactory-flux`.")
    else:
        out().print(render.components_table(records, out().width))


def list_plugins(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
) -> None:
    """List loaded plugins: entry point, package, version, hooks implemented, and any problem with its file:line.

    Exits non-zero in strict mode (FLOWFACTORY_STRICT_PLUGINS=1) when a plugin has a problem, after the table."""
    state = _state(ctx)
    records = render.plugin_records(state.plugins)
    if as_json:
        _print_json(records)
    else:
        out().print(render.plugins_table(records))
    if ctx.meta.get(STRICT_KEY) and state.problems:
        n = len(state.problems)
        print_error(f"{n} plugin{'s' if n != 1 else ''} ha{'ve' if n != 1 else 's'} a problem (see above); "
                    "FLOWFACTORY_STRICT_PLUGINS=1 makes that an error. Fix or uninstall "
                    f"{', '.join(sorted({p.package for p in state.problems}))}.")
        raise typer.Exit(USER_ERROR)
    if not as_json and any(r["error"] or r["warning"] or r["slow_imports"] for r in records):
        out().print("[dim]A failed plugin's components are left out. Fix or uninstall its package; "
                    "FLOWFACTORY_STRICT_PLUGINS=1 makes every failure and warning an error.[/]")


def show(
    ctx: typer.Context,
    kind: Annotated[str, typer.Argument(metavar="KIND", help=f"One of {', '.join(KINDS)}.",
                                        autocompletion=_complete_kind)],
    name: Annotated[str, typer.Argument(metavar="NAME", help="Component name, as `ff list` shows it.",
                                        autocompletion=_complete_name)],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show one component: summary, package, version and every option with its type and default."""
    from flowfactory_cli.describe import option_rows

    state = _state(ctx)
    _note_plugin_failures(state)
    kind = _normalise_kind(kind)
    spec = state.registry.get(kind, name, contested_ok=True)
    if state.registry.contested(kind, name):
        print_warning(state.registry.contested_message(kind, name) + " Shown: the one kept, the first loaded.")
    rows = option_rows(spec.options)
    if as_json:
        _print_json(render.component_record(spec, rows))
    else:
        render.print_component(out(), spec, rows)


SetOption = Annotated[list[str] | None, typer.Option(
    "--set", "-s", metavar="KEY=VALUE",
    help="Override a config value, e.g. --set train.epochs=5 or --set rewards.0.weight=2 (value read as YAML). "
         "Repeatable.")]
ConfigArgument = Annotated[Path, typer.Argument(metavar="CONFIG", help="YAML run config.", show_default=False)]


ProcessesOption = Annotated[int, typer.Option(
    "--processes", "-n", min=1, help="Processes the run will be launched with (its world size).")]


def _load_config(ctx: click.Context, config: Path, overrides: list[str] | None, processes: int = 1
                 ) -> tuple[RunConfig, dict[str, BaseModel]]:
    from flowfactory import config as ff_config

    state = _state(ctx)
    _note_plugin_failures(state)
    return ff_config.load(config, list(overrides or []), registry=state.registry, processes=processes)


def validate(ctx: typer.Context, config: ConfigArgument, overrides: SetOption = None,
             processes: ProcessesOption = 1) -> None:
    """Check a run config, for a launch over N processes, without loading any weights; print a summary of the
    run or every problem."""
    cfg, _ = _load_config(ctx, config, overrides, processes)
    console = out()
    console.print(f"[green]{escape(str(config))} is valid.[/]")
    console.print(render.config_summary(cfg, _state(ctx).registry))


def plan(
    ctx: typer.Context,
    config: ConfigArgument,
    overrides: SetOption = None,
    processes: ProcessesOption = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (bytes) instead of tables.")] = False,
) -> None:
    """Per-process memory of a run before launch, from the model's config alone (no weights loaded)."""
    cfg, options = _load_config(ctx, config, overrides, processes)
    from flowfactory.plan import plan_memory

    record = plan_memory(cfg, options, _state(ctx).registry, processes, source=str(config)).to_dict()
    if as_json:
        _print_json(record)
    else:
        render.print_plan(out(), record)


def run(
    ctx: typer.Context,
    config: ConfigArgument,
    overrides: SetOption = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="DIR", help="Output folder; default: the config's output_dir, else runs/<name>.",
        show_default=False)] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in the output folder from its last checkpoint.")] = False,
) -> None:
    """Validate a run config, then train it; ends with a summary of rewards and output paths."""
    cfg, options = _load_config(ctx, config, overrides)
    import flowfactory.train as ff_train  # looked up at call time, so tests can replace `run`

    try:
        summary = ff_train.run(cfg, options, output_dir=str(output) if output is not None else None,
                               resume=resume, source=str(config), registry=_state(ctx).registry,
                               resume_command=resume_command(config, overrides, output))
    except KeyboardInterrupt as exc:  # Ctrl-C, or flowfactory.errors.RunInterrupted (SIGINT/SIGTERM, saved)
        if _is_main_process():
            err().print(f"\nInterrupted. Continue from the last checkpoint with:\n  "
                        f"{escape(resume_command(config, overrides, output))}", soft_wrap=True)
        raise typer.Exit(getattr(exc, "exit_code", INTERRUPTED)) from None
    if _is_main_process():
        out().print(render.run_summary_panel(summary))


def plot(
    run_dirs: Annotated[list[Path], typer.Argument(
        metavar="RUN_DIR...", help="Run folders (each holds a metrics.jsonl); several are overlaid.",
        show_default=False)],
    output: Annotated[Path | None, typer.Option(
        "--out", "-o", metavar="FILE", help="PNG to write; default: RUN_DIR/curves.png for one run, ./curves.png "
                                            "for several.", show_default=False)] = None,
    metrics: Annotated[list[str] | None, typer.Option(
        "--metric", "-m", metavar="NAME", help="Plot this metric (e.g. loss, eval/reward/mean) instead of the reward "
                                               "curves. Repeatable.", show_default=False)] = None,
) -> None:
    """Draw reward curves (per reward, train and eval, against epochs) of one or more runs into one PNG."""
    from flowfactory.train.logging import draw_curves, metric_panels, read_metrics, reward_panels, save_figure

    runs: dict[str, list[dict[str, Any]]] = {}
    names = [d.name or str(d) for d in run_dirs]
    for d, name in zip(run_dirs, names):
        path = d / "metrics.jsonl"
        if not d.is_dir():
            raise FlowFactoryError(f"{d} is not a folder; give run folders (e.g. runs/quickstart)")
        if not path.is_file():
            raise FlowFactoryError(f"{d} holds no metrics.jsonl: it is not a run folder, or its run has not "
                                   f"finished an epoch yet")
        rows = read_metrics(path)
        if not rows:
            raise FlowFactoryError(f"{path} holds no metrics rows yet: its run has not finished an epoch")
        runs[str(d) if names.count(name) > 1 else name] = rows
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise FlowFactoryError("ff plot needs matplotlib: pip install 'flowfactory[plot]'") from None
    if metrics:
        logged = {k for rows in runs.values() for r in rows for k, v in r.items()
                  if isinstance(v, (int, float)) and k != "epoch"}
        missing = [m for m in metrics if m not in logged]
        if missing:
            raise FlowFactoryError(f"no run logged {', '.join(map(repr, missing))}; they logged "
                                   f"{', '.join(sorted(logged))}")
        panels = metric_panels(runs, list(metrics))
    else:
        panels = reward_panels(runs)
        if not panels:
            raise FlowFactoryError("the runs logged no reward metrics (reward/mean); pick others with --metric")
    target = output if output is not None else (run_dirs[0] / "curves.png" if len(run_dirs) == 1
                                                else Path("curves.png"))
    title = ", ".join(runs) if len(runs) > 1 else next(iter(runs))
    try:
        save_figure(draw_curves(panels, title=title), target)
    except OSError as exc:
        raise FlowFactoryError(f"cannot write {target}: {exc.strerror or exc}") from exc
    out().print(f"wrote {escape(str(target))}")


def _is_main_process() -> bool:
    """False in the non-zero ranks of `accelerate launch`/`torchrun` (RANK is set by both), so a
    multi-process run prints its summary once."""
    return os.environ.get("RANK", "0") == "0"


def resume_command(config: Path, overrides: list[str] | None, output: Path | None) -> str:
    """The `ff run ... --resume` line that continues an interrupted run with the same arguments."""
    words = ["ff", "run", str(config)]
    for item in overrides or []:
        words += ["--set", item]
    if output is not None:
        words += ["--output", str(output)]
    return shlex.join([*words, "--resume"])


# --- the application --------------------------------------------------------------------------------------

BUILTIN_COMMANDS: tuple[tuple[str, Any], ...] = (
    ("list", list_components),
    ("plugins", list_plugins),
    ("show", show),
    ("validate", validate),
    ("plan", plan),
    ("run", run),
    ("new", new_package),
    ("plot", plot),
)


def _command_names(app: typer.Typer, first_command: int = 0, first_group: int = 0) -> set[str]:
    """Names of the commands and command groups registered on `app` from the given positions on."""
    names = {c.name or get_command_name(c.callback.__name__)
             for c in app.registered_commands[first_command:] if c.callback is not None}
    names |= {g.name or g.typer_instance.info.name or "" for g in app.registered_groups[first_group:]}
    return names - {""}


def add_plugin_commands(app: typer.Typer, state: PluginState, strict: bool) -> None:
    """Call each plugin's `register_commands(app)` on its own: a hook that raises, or that adds a command
    `ff` already has, has its additions removed and its failure recorded on the plugin (`ff plugins` shows
    it); with strict, it is a PluginError instead."""
    taken = _command_names(app)
    for impl in state.pm.hook.register_commands.get_hookimpls():
        info = state.info_for(impl.plugin_name)
        if info is not None and info.error:
            continue
        n_commands, n_groups = len(app.registered_commands), len(app.registered_groups)
        try:
            impl.function(*[{"app": app}[a] for a in impl.argnames])
            clash = sorted(_command_names(app, n_commands, n_groups) & taken)
            if clash:
                raise PluginError(f"it adds the command {', '.join(map(repr, clash))}, which `ff` already has; "
                                  "rename it in the plugin")
            taken |= _command_names(app, n_commands, n_groups)
        except Exception as exc:  # one plugin's commands must not take `ff` down
            del app.registered_commands[n_commands:]
            del app.registered_groups[n_groups:]
            detail = str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
            who = f"{info.package} {info.version}" if info else impl.plugin_name
            if info is not None:
                info.error = f"register_commands failed: {detail}"
            if strict:
                raise PluginError(f"the commands of plugin {who} could not be added: {detail}. Fix or uninstall "
                                  "that package (FLOWFACTORY_STRICT_PLUGINS=1 makes this an error).") from exc


def create_app(state: PluginState | None = None, *, strict: bool | None = None,
               diagnose: bool = False) -> typer.Typer:
    """A fresh `ff` app bound to `state` (default: the process-wide plugin state), plugin commands added.

    Raises PluginError when a plugin has a problem in strict mode (FLOWFACTORY_STRICT_PLUGINS=1), unless
    `diagnose`: then the app is built anyway, for `ff plugins` (which shows the problems and exits non-zero)
    and `ff --version`.
    """
    state = ff_plugins.get_state() if state is None else state
    strict = ff_plugins.strict_default() if strict is None else strict
    app = typer.Typer(
        name="ff",
        cls=_Group,
        callback=_make_root(strict),
        no_args_is_help=True,
        context_settings={"obj": state, "help_option_names": ["-h", "--help"]},
        pretty_exceptions_show_locals=False,
    )
    for name, function in BUILTIN_COMMANDS:
        app.command(name)(function)
    add_plugin_commands(app, state, strict and not diagnose)
    if strict and not diagnose and (exc := ff_plugins.strict_error(state)) is not None:
        raise exc
    return app


DIAGNOSTIC_COMMANDS = ("plugins", "--version")  # they work in strict mode whatever the plugins' problems


def main(argv: list[str] | None = None) -> None:
    """The `ff` console script: load plugins, build the app and run it (exits with the command's code)."""
    args = sys.argv[1:] if argv is None else list(argv)
    diagnose = bool(args) and args[0] in DIAGNOSTIC_COMMANDS
    try:
        try:
            state = ff_plugins.get_state()
        except PluginError as exc:
            state = getattr(exc, "state", None)
            if not diagnose or state is None:
                raise
        app = create_app(state, diagnose=diagnose)
    except FlowFactoryError as exc:
        print_error(str(exc))
        raise SystemExit(USER_ERROR) from None
    app(args=args, prog_name="ff")
