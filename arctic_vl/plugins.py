"""Plugin discovery through the entry-point group `arctic_vl.plugins`.

A plugin is an installed package whose entry point names a module; importing that module registers its
components (`@MODELS.register(...)`), CLI verbs (`register_cli_verb`) and config checks
(`register_config_check`). Discovery runs once, called by the entry points (the Engine, the CLI's
dispatch, config validation and the schema), never from inside a registry lookup. A plugin that fails
to import (any exception, `SystemExit` included: only KeyboardInterrupt passes) is reported (which
one, what error) and the others still load; everything it registered before it failed is rolled back (every
registry, CLI verbs, config checks, and the state other layers declare with `track_plugin_state`, such as the
model-type table), so a half-loaded plugin changes nothing. Only installed entry points are imported: never a
module path named in a config.

The core's own component modules are named here as strings and imported with importlib, so this
module sits low in the layers (it imports only the registries) and nothing imports in a circle.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from arctic_vl.registry import ALL_REGISTRIES

if TYPE_CHECKING:
    from arctic_vl.config.loader import LocatedConfig
    from arctic_vl.config.schema import EngineConfig

GROUP = "arctic_vl.plugins"

#: the core's own components, registered before any plugin
BUILTIN_MODULES = (
    "arctic_vl.models.hf",
    "arctic_vl.data.factory",
    "arctic_vl.trainers.sft",
    "arctic_vl.optim.optimizers",
    "arctic_vl.optim.schedulers",
    "arctic_vl.checkpoint.checkpointer",
    "arctic_vl.callbacks.builtin",
    "arctic_vl.callbacks.trackers",
    "arctic_vl.distributed.backends",
    "arctic_vl.distributed.deepspeed_backend",
)


@dataclass
class PluginInfo:
    """What `arctic_vl plugins` reports for one plugin."""

    name: str
    module: str
    distribution: str
    ok: bool = True
    error: str = ""
    registered: dict[str, list[str]] = field(default_factory=dict)
    cli_verbs: list[str] = field(default_factory=list)
    #: what a plugin that failed had registered before it failed, all of it undone ("cli" for its verbs)
    rolled_back: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class CliVerb:
    """A plugin's `arctic_vl VERB`: `run(argv)` returns the exit code; `origin` is the plugin that added it."""

    name: str
    help: str
    run: Callable[[list[str]], int]
    origin: str


PLUGINS: list[PluginInfo] = []
CLI_VERBS: dict[str, CliVerb] = {}
CONFIG_CHECKS: list[tuple[str, Callable[..., None]]] = []
_state = {"loaded": False, "loading": False, "origin": "arctic_vl"}


#: names the CLI dispatches itself (set by `arctic_vl.cli`, which owns them: `reserve_cli_verbs`)
_RESERVED_VERBS: set[str] = set()


def reserve_cli_verbs(names: Iterable[str]) -> None:
    """Names a plugin may not take as CLI verbs (the core's own verbs always win the dispatch)."""
    _RESERVED_VERBS.update(names)


def register_cli_verb(name: str, run: Callable[[list[str]], int], help: str = "") -> None:
    """Add `arctic_vl NAME ...`; `run(argv)` returns the exit code.

    A name the core dispatches itself is refused (ValueError): the plugin's verb would never run.
    Registering the same function twice is harmless; another plugin's verb under a taken name is refused.
    """
    if name in _RESERVED_VERBS:
        raise ValueError(f"CLI verb '{name}' is a core arctic_vl verb; choose another name")
    existing = CLI_VERBS.get(name)
    if existing is not None and existing.run is not run and existing.origin != _state["origin"]:
        raise ValueError(f"CLI verb '{name}' is already provided by {existing.origin}")
    CLI_VERBS[name] = CliVerb(name, help, run, _state["origin"])


def register_config_check(check: Callable[[EngineConfig, LocatedConfig], None]) -> None:
    """Run `check(config, located)` after every section validated; it raises ConfigError to reject a config.

    `located.where(("trainer", "seed"))` gives the `file:line` of a key for the message. Idempotent.
    """
    if all(c is not check for _, c in CONFIG_CHECKS):
        CONFIG_CHECKS.append((_state["origin"], check))


def run_config_checks(cfg: EngineConfig, located: LocatedConfig) -> None:
    """Run every registered config check, in registration order (the core's first)."""
    for _, check in CONFIG_CHECKS:
        check(cfg, located)


def _snapshot() -> dict[str, set[str]]:
    return {section: set(reg._classes) for section, reg in ALL_REGISTRIES.items()}


#: (snapshot, restore) of registration tables kept above this layer (e.g. the model-type table)
_TRACKED: list[tuple[Callable[[], Any], Callable[[Any], None]]] = []
#: while a plugin loads: (restore, saved) of every tracked table, to undo what it did if it fails
_saves: list[tuple[Callable[[Any], None], Any]] = []


def track_plugin_state(snapshot: Callable[[], Any], restore: Callable[[Any], None]) -> None:
    """Declare a registration table kept outside the registries (called once by the module that owns it):
    `snapshot()` returns a copy of it, `restore(copy)` puts that copy back. A plugin that fails to load gets
    its entries undone by it, like its registry entries. Declared while a plugin loads (the owning module
    imported by the plugin itself), the table is saved as it is then: before the plugin could add to it."""
    _TRACKED.append((snapshot, restore))
    if _state["origin"] != "arctic_vl":
        _saves.append((restore, snapshot()))


def _save_all() -> dict[str, Any]:
    _saves[:] = [(restore, snap()) for snap, restore in _TRACKED]
    return {"classes": {s: dict(r._classes) for s, r in ALL_REGISTRIES.items()},
            "origins": {s: dict(r._origin) for s, r in ALL_REGISTRIES.items()},
            "verbs": dict(CLI_VERBS), "checks": list(CONFIG_CHECKS)}


def _restore_all(saved: dict[str, Any]) -> None:
    """Undo everything registered since `_save_all` (a plugin that failed half-way)."""
    for section, reg in ALL_REGISTRIES.items():
        reg._classes.clear()
        reg._classes.update(saved["classes"][section])
        reg._origin.clear()
        reg._origin.update(saved["origins"][section])
    CLI_VERBS.clear()
    CLI_VERBS.update(saved["verbs"])
    CONFIG_CHECKS[:] = saved["checks"]
    for restore, copy in _saves:
        restore(copy)


def _set_origin(origin: str) -> None:
    _state["origin"] = origin
    for reg in ALL_REGISTRIES.values():
        reg.current_origin = origin


def load_plugins() -> list[PluginInfo]:
    """Import the core's components, then every installed plugin, once. Returns what was found."""
    if _state["loaded"] or _state["loading"]:
        return PLUGINS
    _state["loading"] = True
    try:
        _set_origin("arctic_vl")
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
        from importlib.metadata import entry_points

        for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            info = PluginInfo(ep.name, ep.value, f"{dist.name} {dist.version}" if dist else "?")
            before = _snapshot()
            verbs_before = set(CLI_VERBS)
            checks_before = len(CONFIG_CHECKS)
            saved = _save_all()
            _set_origin(ep.name)
            try:
                module = ep.load()
                hook = getattr(module, "register", None)
                if callable(hook):
                    hook()
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # a broken plugin (even one calling sys.exit) must not take the others down
                info.ok = False
                last = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
                at = f" ({last.filename}:{last.lineno})" if last else ""
                info.error = f"{type(e).__name__}: {e}{at}"
                print(f"arctic_vl: plugin '{ep.name}' ({ep.value}) failed to load: {info.error}", file=sys.stderr)
            after = _snapshot()
            info.registered = {s: sorted(after[s] - before[s]) for s in after if after[s] - before[s]}
            info.cli_verbs = sorted(set(CLI_VERBS) - verbs_before)
            if not info.ok:
                # nothing of a plugin that failed stays: its checks would reject good configs, its verbs and
                # components would run half-initialised code
                info.rolled_back = dict(info.registered)
                if info.cli_verbs:
                    info.rolled_back["cli"] = info.cli_verbs
                checks = len(CONFIG_CHECKS) - checks_before
                if checks > 0:
                    info.rolled_back["config checks"] = [getattr(c, "__qualname__", repr(c))
                                                         for _, c in CONFIG_CHECKS[checks_before:]]
                _restore_all(saved)
                info.registered, info.cli_verbs = {}, []
            _saves.clear()
            PLUGINS.append(info)
    finally:
        _set_origin("arctic_vl")
        _state["loading"] = False
        _state["loaded"] = True
    return PLUGINS


def describe() -> str:
    """The report of `arctic_vl plugins`: the core's components, then each plugin with what it registered."""
    load_plugins()
    lines = ["core (arctic_vl):"]
    for section, reg in ALL_REGISTRIES.items():
        names = [n for n in reg.names() if reg.origin(n) == "arctic_vl"]
        if names:
            lines.append(f"  {section}: {', '.join(names)}")
    for info in PLUGINS:
        status = "ok" if info.ok else f"FAILED: {info.error}"
        lines.append(f"{info.name} ({info.module}, {info.distribution}): {status}")
        if info.rolled_back:
            undone = "; ".join(f"{section}: {', '.join(names)}" for section, names in info.rolled_back.items())
            lines.append(f"  rolled back (not usable): {undone}")
        for section, names in info.registered.items():
            lines.append(f"  {section}: {', '.join(names)}")
        if info.cli_verbs:
            lines.append(f"  cli: {', '.join(info.cli_verbs)}")
    if not PLUGINS:
        lines.append("(no plugins installed in entry-point group arctic_vl.plugins)")
    return "\n".join(lines)


def plugin_summary() -> dict[str, Any]:
    """Plugins as data (for run_info.json)."""
    load_plugins()
    return {p.name: {"ok": p.ok, "distribution": p.distribution, "error": p.error or None} for p in PLUGINS}
