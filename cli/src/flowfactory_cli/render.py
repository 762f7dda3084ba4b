"""Tables and panels of `ff`: the data is computed elsewhere; this module only lays it out.

Each `*_records` function returns the JSON-ready rows a `--json` flag prints; the table of the same
command is drawn from those rows, so both outputs always agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from flowfactory_cli.describe import OptionRow

if TYPE_CHECKING:
    from flowfactory.config import RunConfig
    from flowfactory.plugins import PluginInfo
    from flowfactory.registry import ComponentSpec, Registry


def component_records(specs: list[ComponentSpec]) -> list[dict[str, str]]:
    return [{"kind": s.kind, "name": s.name, "package": s.package, "version": s.version, "summary": s.summary}
            for s in specs]


def components_table(records: list[dict[str, str]], width: int = 200) -> Table:
    """kind | name | package | version | summary; below 110 columns the version joins the package cell and
    the package name folds, so the summary keeps a readable width on an 80-column terminal."""
    narrow = width < 110
    table = Table(show_edge=False)  # pad_edge=False makes rich crop a squeezed last column's text
    table.add_column("kind", no_wrap=True)
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("package", overflow="fold", min_width=12 if narrow else None, no_wrap=not narrow)
    if not narrow:
        table.add_column("version", no_wrap=True)
    table.add_column("summary", overflow="fold", min_width=20)
    for r in records:
        cells = [r["kind"], r["name"], r["package"], r["version"], r["summary"]]
        if narrow:
            cells[2:4] = [f"{r['package']} {r['version']}"]
        table.add_row(*(escape(c) for c in cells))
    return table


def plugin_records(plugins: list[PluginInfo]) -> list[dict[str, Any]]:
    return [{"name": p.name, "package": p.package, "version": p.version, "entry_point": p.entry_point,
             "hooks": list(p.hooks), "error": p.error, "warning": p.warning, "slow_imports": list(p.slow_imports)}
            for p in plugins]


def plugin_status(r: dict[str, Any]) -> str:
    """The status cell of one plugin (rich markup): failed, warning, slow start-up, or ok."""
    lines = []
    if r["error"]:
        lines.append(f"[red]failed: {escape(r['error'])}[/]")
    if r["warning"]:
        lines.append(f"[yellow]warning: {escape(r['warning'])}[/]")
    if r["slow_imports"]:
        lines.append(f"[yellow]slow: imports {escape(', '.join(r['slow_imports']))} when it loads, which slows "
                     "every `ff` command; import it inside build functions[/]")
    return "\n".join(lines) or "[green]ok[/]"


def plugins_table(records: list[dict[str, Any]]) -> Table:
    table = Table(show_edge=False, pad_edge=False)
    for col in ("name", "package", "version"):
        table.add_column(col, no_wrap=True)
    table.add_column("hooks", overflow="fold")
    table.add_column("status", overflow="fold")
    for r in records:
        table.add_row(escape(r["name"]), escape(r["package"]), escape(r["version"]),
                      escape(", ".join(r["hooks"]) or "-"), plugin_status(r))
    return table


def version_records() -> list[tuple[str, str]]:
    """(distribution, version) for `ff --version`: flowfactory, flowfactory-cli, every installed package that
    provides a `flowfactory` entry point or depends on flowfactory (a library such as flowfactory-diffusers,
    which model plugins build on), then torch and diffusers; read from the installed metadata, so nothing is
    imported ("not installed" when absent)."""
    import re
    from importlib import metadata

    from flowfactory.plugins import ENTRY_POINT_GROUP

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    def requires_core(dist: metadata.Distribution) -> bool:
        names = (re.match(r"[A-Za-z0-9._-]*", req).group() for req in dist.requires or ())  # type: ignore[union-attr]
        return any(re.sub(r"[-_.]+", "-", name).lower() == "flowfactory" for name in names)

    plugins = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.dist is not None:
            plugins[ep.dist.metadata["Name"]] = ep.dist.version
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and name not in ("flowfactory", "flowfactory-cli") and requires_core(dist):
            plugins[name] = dist.version
    rows = [("flowfactory", version("flowfactory")), ("flowfactory-cli", version("flowfactory-cli"))]
    rows += sorted(plugins.items())
    rows += [(name, version(name)) for name in ("torch", "diffusers")]
    return rows


def versions_text(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {ver}" for name, ver in rows)


def component_record(spec: ComponentSpec, rows: list[OptionRow]) -> dict[str, Any]:
    return {"kind": spec.kind, "name": spec.name, "package": spec.package, "version": spec.version,
            "summary": spec.summary, "options": [r.as_dict() for r in rows]}


def print_component(console: Console, spec: ComponentSpec, rows: list[OptionRow]) -> None:
    """`ff show`: header lines, then the options table (or a note that there are none)."""
    console.print(f"[bold]{escape(spec.name)}[/] ({spec.kind}) from {escape(spec.package)} {escape(spec.version)}")
    if spec.summary:
        console.print(escape(spec.summary))
    console.print()
    if not rows:
        console.print("No options.")
        return
    if console.width < 110:  # a table's four columns leave a narrow terminal a few letters of description
        console.print("[bold]options[/]")
        for r in rows:
            default = "[red]required[/]" if r.required else f"default {escape(r.default)}"
            console.print(f"[bold]{escape(r.name)}[/]  {escape(r.type)}  ({default})", overflow="fold")
            if r.description:
                console.print(Padding(Text(r.description, overflow="fold"), (0, 0, 0, 4), expand=False))
        return
    table = Table(title="options", title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("type", overflow="fold")
    table.add_column("default", overflow="fold")
    table.add_column("description", overflow="fold")
    for r in rows:
        default = "[red]required[/]" if r.required else escape(r.default)
        table.add_row(escape(r.name), escape(r.type), default, escape(r.description))
    console.print(table)


def _component_line(registry: Registry, kind: str, name: str) -> str:
    spec = registry.get(kind, name)
    return f"{escape(name)} [dim]({escape(spec.package)} {escape(spec.version)})[/]"


def config_summary(cfg: RunConfig, registry: Registry) -> Table:
    """The few facts that identify a run: components, data, epochs and group size, output folder."""
    t = cfg.train
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    grid.add_row("name", escape(cfg.name))
    grid.add_row("policy", _component_line(registry, "policy", cfg.policy.name))
    grid.add_row("sampler", _component_line(registry, "sampler", cfg.sampler.name))
    for i, r in enumerate(cfg.rewards):
        grid.add_row("rewards" if i == 0 else "", f"{_component_line(registry, 'reward', r.name)} weight {r.weight:g}")
    grid.add_row("optimizer", _component_line(registry, "optimizer", cfg.optimizer.name))
    grid.add_row("data", f"train {escape(cfg.data.train)}, eval {escape(str(cfg.data.eval or 'off'))}")
    grid.add_row("epochs", str(t.epochs))
    grid.add_row("group size", f"{t.group_size} rollouts per prompt, {t.prompts_per_epoch} prompts per epoch "
                                f"({t.group_size * t.prompts_per_epoch} rollouts per epoch)")
    grid.add_row("output", escape(cfg.output_dir or f"runs/{cfg.name}"))  # RunConfig.output_dir's default
    return grid


def duration(seconds: float) -> str:
    """12.3s, 4m 05s, 2h 03m 10s."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def run_summary_panel(summary: Any) -> Panel:
    """The panel `ff run` ends with, from the loop's RunSummary (any object with its fields)."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    epochs = str(summary.epochs)
    if summary.resumed_from is not None:
        epochs += f" (resumed after epoch {summary.resumed_from})"
    grid.add_row("epochs", epochs)
    first, last = float(summary.reward_first), float(summary.reward_last)
    window = int(getattr(summary, "window", 5))
    metric = str(getattr(summary, "metric", "reward/mean"))
    label = "mean reward" if metric == "reward/mean" else metric
    unit = "eval" if metric.startswith("eval/") else "epoch"
    if window > 0:
        what = unit if window == 1 else f"{window} {unit}s"
        grid.add_row(label, f"{first:.4f} -> {last:.4f} ({last - first:+.4f}), first vs last {what}")
    else:
        grid.add_row(label, f"run too short to compare (one {unit})")
    grid.add_row("output", escape(str(summary.output_dir)))
    for label, path in (("final model", summary.final_dir), ("metrics", summary.metrics_path),
                        ("samples", summary.samples_dir)):
        if path is not None and Path(path).exists():  # only what the run wrote
            grid.add_row(label, escape(str(path)))
    best = getattr(summary, "best", None)
    if best and Path(best["dir"]).exists():
        grid.add_row("best model", f"{escape(str(best['dir']))} (epoch {best['epoch']}, "
                                   f"{escape(str(best['metric']))} {float(best['value']):.4f})")
    grid.add_row("wall time", duration(float(summary.wall_seconds)))
    return Panel(grid, title="run finished", title_align="left", expand=False)


def _units(n: int) -> str:
    """Bytes in binary units (1.50 GiB), as `flowfactory.plan.human_bytes`."""
    from flowfactory.plan import human_bytes

    return human_bytes(n)


def print_plan(console: Console, record: dict[str, Any]) -> None:
    """`ff plan`: the parameters of each part, then memory per process by item with a total; drawn from the
    JSON record (`MemoryPlan.to_dict`) so the table and `--json` agree."""
    parts = Table(show_edge=False, title=f"{escape(record['policy'])} policy: parameters", title_justify="left")
    for col in ("part", "role", "class"):
        parts.add_column(col, no_wrap=True)
    parts.add_column("parameters", justify="right")
    parts.add_column("trainable", justify="right")
    for p in record["parts"]:
        parts.add_row(escape(p["name"]), p["role"], escape(p["label"]), f"{p['parameters']:,}", f"{p['trainable']:,}")
    console.print(parts)
    n = record["processes"]
    rows = Table(show_edge=False, title=f"memory per process ({n} process{'es' if n != 1 else ''}, "
                                        f"{record['strategy']})", title_justify="left")
    rows.add_column("item", no_wrap=True)
    rows.add_column("bytes", justify="right", no_wrap=True)
    rows.add_column("how", overflow="fold")
    for r in record["rows"]:
        rows.add_row(escape(r["item"]) + (" [dim](host)[/]" if r["host"] else ""), _units(r["bytes"]),
                     escape(r["detail"]))
    rows.add_row("activations", "[yellow]not estimated[/]", "depend on resolution, micro_batch_size and "
                 "gradient_checkpointing; measure them")
    rows.add_section()
    rows.add_row("[bold]total[/]", f"[bold]{_units(record['device_total'])}[/]", "device memory per process, "
                 "activations excluded" + (f"; host: {_units(record['host_total'])}" if record["host_total"] else ""))
    console.print(rows)
    for note in record["notes"]:
        console.print(f"[dim]{escape(note)}[/]")
