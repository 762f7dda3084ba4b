"""The plugin manager: loads entry points of group `flowfactory` one by one.

One broken plugin never takes `ff` down: each entry point is loaded in its own try/except and the
failure is recorded (shown by `ff plugins`). FLOWFACTORY_STRICT_PLUGINS=1 raises instead.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from flowfactory import hookspecs
from flowfactory.errors import PluginError
from flowfactory.registry import HOOK_FOR_KIND, Registry

ENTRY_POINT_GROUP = "flowfactory"
BUILTIN_MODULES = ("flowfactory.samplers", "flowfactory.rewards")


@dataclass
class PluginInfo:
    name: str  # entry point name, or module name of a built-in
    package: str
    version: str
    hooks: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class PluginState:
    pm: pluggy.PluginManager
    registry: Registry
    plugins: list[PluginInfo]

    @property
    def errors(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error]

    def info_for(self, plugin_name: str) -> PluginInfo | None:
        """The PluginInfo of a plugin by its plugin-manager name (`HookImpl.plugin_name`)."""
        return next((p for p in self.plugins if _pm_name(p) == plugin_name), None)


def _pm_name(info: PluginInfo) -> str:
    """The name a plugin is registered under in the plugin manager: `package:entry-point`."""
    return f"{info.package}:{info.name}"


def strict_default() -> bool:
    return os.environ.get("FLOWFACTORY_STRICT_PLUGINS", "").lower() in ("1", "true", "yes")


def _core_version() -> str:
    from flowfactory import __version__

    return __version__


def _hook_names(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    return sorted(hc.name for hc in pm.get_hookcallers(plugin) or [])


def _where(exc: BaseException) -> str:
    """' (at file:line)' of the innermost frame of a failure, so a one-line message still points at it."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _unknown_hook_message(pm: pluggy.PluginManager, plugin: Any, info: PluginInfo | None) -> str:
    """Name the package and the misspelled hook, and suggest the closest real hook name."""
    import difflib

    known = sorted(n for n in vars(hookspecs) if n.startswith("register_"))
    unknown = sorted(hc.name for hc in pm.get_hookcallers(plugin) or [] if not hc.has_spec())
    who = f"plugin {info.name!r} from {info.package} {info.version}" if info else f"plugin {plugin!r}"
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (f"{who} implements unknown hook {', '.join(parts)}. Check its spelling: the hooks of "
            f"flowfactory are {', '.join(known)}.")


def load(
    *,
    entry_points: bool = True,
    extra_plugins: list[tuple[Any, str, str]] | None = None,
    strict: bool | None = None,
) -> PluginState:
    """Build a plugin manager and registry.

    extra_plugins: (plugin object, package name, version) registered after the entry points, as tests
    do to add an inline plugin.
    """
    strict = strict_default() if strict is None else strict
    pm = pluggy.PluginManager("flowfactory")
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    owners: dict[int, PluginInfo] = {}

    def _add(obj: Any, info: PluginInfo) -> None:
        pm.register(obj, name=_pm_name(info))
        info.hooks = _hook_names(pm, obj)
        owners[id(obj)] = info
        infos.append(info)

    import importlib

    for modname in BUILTIN_MODULES:
        _add(importlib.import_module(modname), PluginInfo(modname, "flowfactory", _core_version()))

    if entry_points:
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            package = dist.metadata["Name"] if dist is not None else ep.value.split(":")[0]
            version = dist.version if dist is not None else "?"
            info = PluginInfo(ep.name, package, version)
            try:
                _add(ep.load(), info)
            except Exception as exc:  # a broken plugin must not take ff down
                info.error = f"{type(exc).__name__}: {exc}"
                infos.append(info)
                if strict:
                    # One line naming where it failed; the full traceback stays on the chained exception.
                    raise PluginError(
                        f"plugin {ep.name!r} from {package} {version} failed to load: {info.error}"
                        f"{_where(exc)}. Fix or uninstall that package "
                        "(FLOWFACTORY_STRICT_PLUGINS=1 makes this an error)."
                    ) from exc

    for obj, package, version in extra_plugins or []:
        _add(obj, PluginInfo(getattr(obj, "__name__", type(obj).__name__), package, version))

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(_unknown_hook_message(pm, exc.plugin, owners.get(id(exc.plugin)))) from exc

    registry = Registry()
    for kind, hook in HOOK_FOR_KIND.items():
        for impl in getattr(pm.hook, hook).get_hookimpls():
            info = owners[id(impl.plugin)]
            if info.error:
                continue
            register = registry.registrar(kind, info.package, info.version)
            try:
                impl.function(*[{"register": register}[a] for a in impl.argnames])
            except PluginError:
                raise
            except Exception as exc:
                info.error = f"{hook} raised {type(exc).__name__}: {exc}"
                if strict:
                    raise PluginError(f"{info.package}: {info.error}") from exc
    return PluginState(pm=pm, registry=registry, plugins=infos)


_STATE: PluginState | None = None


def get_state() -> PluginState:
    """The process-wide plugin state, loaded once."""
    global _STATE
    if _STATE is None:
        _STATE = load()
    return _STATE


def get_registry() -> Registry:
    return get_state().registry


def reset() -> None:
    """Forget the loaded plugins (tests)."""
    global _STATE
    _STATE = None
