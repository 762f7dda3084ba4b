"""The plugin manager: loads entry points of group `flowfactory` one by one.

One broken plugin never takes `ff` down. Each plugin is loaded, checked and registered on its own, and any
problem is recorded on its `PluginInfo` (shown by `ff plugins`, with the plugin's file:line) while its
components are left out:

- its import fails (the entry point names a missing module or attribute, or the module raises);
- it implements a hook flowfactory does not have (a misspelling), or a hook with an argument the spec lacks;
- a `register_*` hook raises, or calls `register` wrongly (options that are not a pydantic model, ...);
- it registers a kind+name another package already registered: the first loaded (built-ins, then entry
  points by name) keeps it, the name is marked contested so a config naming it is refused, and the later
  package's components are all left out;
- (a warning) its module has no `@hookimpl` at all.

A heavy package (torch, diffusers, ...) imported while an entry point loads is recorded too (`slow_imports`):
it slows every `ff` command but is not an error. FLOWFACTORY_STRICT_PLUGINS=1 turns every error and warning
into a PluginError raised after everything is loaded; the error carries the lenient state (`.state`), so
`ff plugins` can still show it.
"""

from __future__ import annotations

import builtins
import difflib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pluggy

from flowfactory import hookspecs
from flowfactory.errors import PluginError
from flowfactory.registry import HOOK_FOR_KIND, ComponentSpec, Registry

ENTRY_POINT_GROUP = "flowfactory"
BUILTIN_MODULES = ("flowfactory.samplers", "flowfactory.rewards")
# Packages an entry-point module must not import at import time: each costs seconds on every `ff` command.
HEAVY_MODULES = ("torch", "diffusers", "transformers", "accelerate")
STRICT_NOTE = "FLOWFACTORY_STRICT_PLUGINS=1 makes this an error"


@dataclass
class PluginInfo:
    name: str  # entry point name, or module name of a built-in
    package: str
    version: str
    hooks: list[str] = field(default_factory=list)
    error: str | None = None  # why it was left out
    warning: str | None = None  # a problem that leaves it loaded; strict mode makes it an error
    slow_imports: list[str] = field(default_factory=list)  # "torch (at file:line)", imported as it loaded
    entry_point: str | None = None  # "name = value" of an installed plugin
    cause: BaseException | None = field(default=None, repr=False, compare=False)  # the exception, if any

    @property
    def problem(self) -> str | None:
        return self.error or self.warning


@dataclass
class PluginState:
    pm: pluggy.PluginManager
    registry: Registry
    plugins: list[PluginInfo]

    @property
    def errors(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error]

    @property
    def problems(self) -> list[PluginInfo]:
        """Plugins with an error or a warning: what strict mode refuses."""
        return [p for p in self.plugins if p.problem]

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


def _who(info: PluginInfo) -> str:
    return f"plugin {info.name!r} from {info.package} {info.version}"


def strict_error(state: PluginState) -> PluginError | None:
    """The PluginError strict mode raises for `state` (None when no plugin has a problem); `.state` is the
    state, so a caller can still show it."""
    bad = state.problems
    if not bad:
        return None
    if len(bad) == 1:
        p = bad[0]
        verb = "failed to load" if p.error else "has a problem"
        message = (f"{_who(p)} {verb}: {p.problem}. Fix or uninstall that package ({STRICT_NOTE}; "
                   "`ff plugins` lists every plugin).")
    else:
        lines = [f"  {_who(p)}: {p.problem}" for p in bad]
        message = "\n".join([f"{len(bad)} plugins have problems:", *lines,
                             f"Fix or uninstall those packages ({STRICT_NOTE}; `ff plugins` lists every plugin)."])
    exc = PluginError(message)
    exc.state = state  # type: ignore[attr-defined]
    exc.__cause__ = next((p.cause for p in bad if p.cause is not None), None)  # the first traceback, kept
    return exc


# --- where a problem is --------------------------------------------------------------------------------

def _plugin_root(module_name: str) -> str | None:
    """The file or package folder of a top-level module, without importing it (None if unknown)."""
    try:
        spec = importlib.util.find_spec(module_name.partition(".")[0])
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
        return None
    return str(Path(spec.origin).parent) if spec.submodule_search_locations else spec.origin


def _object_root(obj: Any) -> str | None:
    module = obj if inspect.ismodule(obj) else sys.modules.get(getattr(type(obj), "__module__", ""), None)
    name = getattr(module, "__name__", None)
    return _plugin_root(name) if name else None


def _where(exc: BaseException, root: str | None = None) -> str:
    """'at file:line' of a failure: the innermost frame outside the import machinery and pluggy; when that is
    not in the plugin's own files (`root`), the plugin's innermost frame is added."""
    skip = (os.sep + "importlib" + os.sep, os.sep + "pluggy" + os.sep, __file__)
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith("<") and not any(s in f.filename for s in skip)]
    if not frames:
        return ""
    inner = frames[-1]
    where = f"at {inner.filename}:{inner.lineno}"
    if root is not None and not inner.filename.startswith(root):
        own = [f for f in frames if f.filename.startswith(root)]
        if own:
            where += f", from {own[-1].filename}:{own[-1].lineno}"
    return where


def _function_where(fn: Any) -> str:
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    code = getattr(fn, "__code__", None)
    return f"{code.co_filename}:{code.co_firstlineno}" if code is not None else repr(fn)


def _import_error(ep: Any, package: str, exc: BaseException) -> str:
    """What failed when an entry point loaded: the entry point itself (a module or attribute it names that
    does not exist) or the plugin's code, at its file:line."""
    value = ep.value.strip()
    module, _, attrs = value.partition(":")
    module = module.strip()
    named = f"entry point `{ep.name} = {value}` of {package}"
    fix = f"fix it under [project.entry-points.flowfactory] in {package}'s pyproject.toml and reinstall"
    if isinstance(exc, ModuleNotFoundError) and exc.name and (module == exc.name
                                                              or module.startswith(exc.name + ".")):
        return f"{named} names module {module!r}, which is not installed (no module named {exc.name!r}); {fix}"
    if isinstance(exc, AttributeError) and attrs and module in sys.modules:
        obj: Any = sys.modules[module]
        for attr in attrs.strip().split("."):
            if not hasattr(obj, attr):
                return f"{named} names {attrs.strip()!r}, which module {module!r} does not define; {fix}"
            obj = getattr(obj, attr)
    where = _where(exc, _plugin_root(module))
    text = f"{type(exc).__name__}: {exc}" + (f" ({where})" if where else "")
    if isinstance(exc, ModuleNotFoundError):
        text += f"; install the missing package, or uninstall {package}"
    return text


@contextmanager
def _watching_heavy_imports() -> Iterator[list[str]]:
    """Record the heavy packages (HEAVY_MODULES) imported inside the block, each with the file:line of the
    first import statement that named it: import statements go through `builtins.__import__`, replaced
    for the block; a heavy module that appeared in sys.modules some other way is listed without a line."""
    found: list[str] = []
    seen: set[str] = set()
    before = {m for m in HEAVY_MODULES if m in sys.modules}
    original = builtins.__import__

    def watching(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        top = name.partition(".")[0]
        if level == 0 and top in HEAVY_MODULES and top not in seen:
            seen.add(top)
            caller = sys._getframe(1)
            found.append(f"{top} (at {caller.f_code.co_filename}:{caller.f_lineno})")
        return original(name, globals, locals, fromlist, level)

    builtins.__import__ = watching
    try:
        yield found
    finally:
        builtins.__import__ = original
        found += [m for m in HEAVY_MODULES if m in sys.modules and m not in before and m not in seen]


# --- hooks ---------------------------------------------------------------------------------------------

def _known_hooks() -> list[str]:
    return sorted(n for n, f in vars(hookspecs).items() if hasattr(f, "flowfactory_spec"))


def _check_hooks(pm: pluggy.PluginManager, obj: Any) -> tuple[list[str], str | None]:
    """The hooks `obj` implements, and what is wrong with them (a hook flowfactory does not have, or an
    argument its spec does not pass), each at the implementation's file:line; checked before pluggy sees
    the plugin, so a bad one is never registered."""
    hooks: list[str] = []
    problems: list[str] = []
    known = _known_hooks()
    for attr in dir(obj):
        try:
            opts = pm.parse_hookimpl_opts(obj, attr)
        except Exception:  # an attribute that cannot be read is no hook
            continue
        if opts is None:
            continue
        name = opts.get("specname") or attr
        fn = getattr(obj, attr)
        caller = getattr(pm.hook, name, None)
        if caller is None or not caller.has_spec():
            if not opts.get("optionalhook"):
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"implements unknown hook {name!r}{hint} at {_function_where(fn)}; check its "
                                f"spelling: the hooks of flowfactory are {', '.join(known)}")
            continue
        argnames = pluggy.HookImpl(obj, "check", fn, opts).argnames
        allowed = set(caller.spec.argnames) | set(caller.spec.kwargnames)
        extra = [a for a in argnames if a not in allowed]
        if extra:
            problems.append(f"hook {name}({', '.join(argnames)}) at {_function_where(fn)} takes "
                            f"{', '.join(map(repr, extra))}, which flowfactory does not pass; name its argument "
                            f"{' or '.join(map(repr, caller.spec.argnames))} (a hook may take a subset of "
                            f"{name}({', '.join(caller.spec.argnames)}))")
            continue
        hooks.append(name)
    return sorted(hooks), "; ".join(problems) or None


def _register_components(pm: pluggy.PluginManager, registry: Registry, obj: Any, info: PluginInfo) -> None:
    """Call `obj`'s register_* hooks, collecting its components, then add them all or none."""
    staged: list[ComponentSpec] = []
    for kind, hook in HOOK_FOR_KIND.items():
        for impl in getattr(pm.hook, hook).get_hookimpls():
            if impl.plugin is not obj:
                continue
            register = registry.registrar(kind, info.package, info.version, into=staged)
            try:
                impl.function(*[{"register": register}[a] for a in impl.argnames])
            except PluginError as exc:  # a wrong `register(...)` call; the message names its line
                text = str(exc).removeprefix(f"{info.package}: ")
                info.error, info.cause = f"{hook}: {text}", exc
                return
            except Exception as exc:
                info.cause = exc
                where = _where(exc, _object_root(obj))
                info.error = f"{hook} raised {type(exc).__name__}: {exc}" + (f" ({where})" if where else "")
                return
    clashes = registry.commit(staged)
    if clashes:
        info.error = (f"{'; '.join(clashes)}. The first loaded keeps the name and every component of "
                      f"{info.package} is left out; a config naming it is refused. Uninstall one of the two "
                      "packages, or rename the component in one of them")


def load(
    *,
    entry_points: bool = True,
    extra_plugins: list[tuple[Any, str, str]] | None = None,
    strict: bool | None = None,
) -> PluginState:
    """Build a plugin manager and registry.

    extra_plugins: (plugin object, package name, version) registered after the entry points, as tests
    do to add an inline plugin. strict (default: FLOWFACTORY_STRICT_PLUGINS): raise `strict_error(state)`
    when any plugin has a problem.
    """
    strict = strict_default() if strict is None else strict
    pm = pluggy.PluginManager("flowfactory")
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    loaded: list[tuple[Any, PluginInfo]] = []

    def add(obj: Any, info: PluginInfo) -> None:
        infos.append(info)
        info.hooks, info.error = _check_hooks(pm, obj)
        if info.error:
            return
        if not info.hooks:
            where = getattr(obj, "__file__", None) or _object_root(obj) or repr(obj)
            info.warning = (f"it implements no flowfactory hook: nothing in {where} is marked "
                            "@flowfactory.hookimpl. Mark its register_* functions with @hookimpl, or remove the "
                            "entry point")
            return
        try:
            pm.register(obj, name=_pm_name(info))
        except (pluggy.PluginValidationError, ValueError) as exc:
            same = next((p for o, p in loaded if o is obj), None)
            info.error = (f"it is the same object as {_who(same)}; remove one of the two entry points" if same
                          else f"{type(exc).__name__}: {exc}")
            return
        loaded.append((obj, info))

    for modname in BUILTIN_MODULES:
        add(importlib.import_module(modname), PluginInfo(modname, "flowfactory", _core_version()))

    if entry_points:
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            package = dist.metadata["Name"] if dist is not None else ep.value.split(":")[0]
            version = dist.version if dist is not None else "?"
            info = PluginInfo(ep.name, package, version, entry_point=f"{ep.name} = {ep.value}")
            try:
                with _watching_heavy_imports() as heavy:
                    obj = ep.load()
            except (Exception, SystemExit) as exc:  # a broken plugin must not take ff down
                info.error, info.cause = _import_error(ep, package, exc), exc
                infos.append(info)
                continue
            info.slow_imports = heavy
            add(obj, info)

    for obj, package, version in extra_plugins or []:
        add(obj, PluginInfo(getattr(obj, "__name__", type(obj).__name__), package, version))

    registry = Registry()
    for obj, info in loaded:
        _register_components(pm, registry, obj, info)
    registry.failed_packages = sorted({p.package for p in infos if p.error})
    state = PluginState(pm=pm, registry=registry, plugins=infos)
    if strict and (exc := strict_error(state)) is not None:
        raise exc
    return state


_STATE: PluginState | None = None


def get_state() -> PluginState:
    """The process-wide plugin state, loaded once (strict mode: raises `strict_error` each call)."""
    global _STATE
    if _STATE is None:
        _STATE = load(strict=False)
    if strict_default() and (exc := strict_error(_STATE)) is not None:
        raise exc
    return _STATE


def get_registry() -> Registry:
    return get_state().registry


def reset() -> None:
    """Forget the loaded plugins (tests)."""
    global _STATE
    _STATE = None
