"""Plugin loading and the component registry.

:func:`load_registry` builds a fresh pluggy ``PluginManager`` (nothing happens at import time),
loads every ``gptlab`` entry point one by one (a plugin that fails to import becomes a warning
naming it, and everything else keeps working), calls each plugin's ``register_*`` hooks
separately (so a hook that raises is blamed on its own plugin) and indexes the returned classes
by name. Two plugins registering the same name is a :class:`~gptlab.core.errors.PluginError`
naming both.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterable

import attrs
import pluggy

from gptlab.core import hookspecs
from gptlab.core.attention import AttentionBackend
from gptlab.core.errors import PluginError, UnknownComponentError
from gptlab.core.interfaces import Block, LanguageModel, Tokenizer

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "gptlab"

#: hook name -> (registry kind, required base class, human label)
KINDS = {
    "register_tokenizers": ("tokenizers", Tokenizer, "tokenizer"),
    "register_models": ("models", LanguageModel, "model"),
    "register_blocks": ("blocks", Block, "block"),
    "register_attention_backends": ("attention_backends", AttentionBackend, "attention backend"),
}


@attrs.define
class PluginInfo:
    """One loaded plugin and what it registered (for ``gpt plugins``)."""

    name: str
    source: str  # "entry point pkg.module (dist x.y)" or "in-process"
    registered: dict[str, list[str]] = attrs.Factory(dict)


@attrs.define
class Registry:
    """Registered component classes by kind and name, plus the problems met while loading."""

    pm: pluggy.PluginManager
    plugins: list[PluginInfo] = attrs.Factory(list)
    tokenizers: dict[str, type] = attrs.Factory(dict)
    models: dict[str, type] = attrs.Factory(dict)
    blocks: dict[str, type] = attrs.Factory(dict)
    attention_backends: dict[str, type] = attrs.Factory(dict)
    owners: dict[tuple[str, str], str] = attrs.Factory(dict)  # (kind, name) -> plugin
    problems: list[str] = attrs.Factory(list)  # warnings: broken plugins

    def get(self, kind: str, name: str) -> type:
        table = getattr(self, kind)
        if name not in table:
            label = next(lbl for k, _, lbl in KINDS.values() if k == kind)
            raise UnknownComponentError(
                f"unknown {label} {name!r}; available: {', '.join(sorted(table)) or 'none'}"
            )
        return table[name]

    def tokenizer(self, name: str) -> type:
        return self.get("tokenizers", name)

    def model(self, name: str) -> type:
        return self.get("models", name)

    def block(self, name: str) -> type:
        return self.get("blocks", name)

    def attention_backend(self, name: str) -> type:
        return self.get("attention_backends", name)


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    return pm


def _load_entry_points(pm: pluggy.PluginManager, problems: list[str]) -> dict[str, str]:
    sources = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = f" ({ep.dist.name} {ep.dist.version})" if ep.dist else ""
        if pm.has_plugin(ep.name):
            problems.append(f"plugin {ep.name!r} from {ep.value}{dist} skipped: another plugin "
                            f"is already registered under that name")
            continue
        try:
            plugin = ep.load()
        except Exception as e:  # any error inside a third-party import must not kill the CLI
            problems.append(f"plugin {ep.name!r} ({ep.value}{dist}) failed to import: "
                            f"{type(e).__name__}: {e}")
            continue
        pm.register(plugin, name=ep.name)
        sources[ep.name] = f"entry point {ep.value}{dist}"
    return sources


def _as_list(result) -> list:
    if result is None:
        return []
    if isinstance(result, (list, tuple)):
        return list(result)
    return [result]


def load_registry(extra_plugins: Iterable[tuple[str, object]] = (), *,
                  entry_points: bool = True) -> Registry:
    """Build a fresh plugin manager and registry.

    ``extra_plugins`` are ``(name, module_or_object)`` pairs registered in-process (for tests and
    notebooks); ``entry_points=False`` skips installed plugins.
    """
    pm = new_plugin_manager()
    reg = Registry(pm=pm)
    sources = _load_entry_points(pm, reg.problems) if entry_points else {}
    for name, plugin in extra_plugins:
        if pm.has_plugin(name):
            raise PluginError(f"plugin name {name!r} is already taken by an installed plugin")
        pm.register(plugin, name=name)
        sources[name] = "in-process"
    infos = {name: PluginInfo(name, sources.get(name, "in-process"))
             for name, _ in pm.list_name_plugin()}
    reg.plugins = list(infos.values())

    for hook_name, (kind, base, label) in KINDS.items():
        table = getattr(reg, kind)
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin = impl.plugin_name
            try:
                classes = _as_list(impl.function())
            except Exception as e:
                reg.problems.append(f"plugin {plugin!r}: {hook_name}() raised "
                                    f"{type(e).__name__}: {e}")
                continue
            for cls in classes:
                if not (isinstance(cls, type) and issubclass(cls, base)):
                    reg.problems.append(f"plugin {plugin!r}: {hook_name}() returned {cls!r}, "
                                        f"not a {base.__name__} subclass; ignored")
                    continue
                cname = getattr(cls, "name", None)
                if not isinstance(cname, str) or not cname:
                    reg.problems.append(f"plugin {plugin!r}: {label} class {cls.__qualname__} "
                                        f"has no 'name'; ignored")
                    continue
                if cname in table and table[cname] is not cls:
                    raise PluginError(
                        f"{label} {cname!r} is registered by both plugin "
                        f"{reg.owners[(kind, cname)]!r} and plugin {plugin!r}; "
                        f"uninstall or rename one of them"
                    )
                table[cname] = cls
                reg.owners[(kind, cname)] = plugin
                infos[plugin].registered.setdefault(label, []).append(cname)
    for problem in reg.problems:
        log.warning(problem)
    return reg


def register_commands(reg: Registry, cli) -> None:
    """Let every plugin add subcommands to ``cli``; a failing plugin becomes a problem entry."""
    for impl in reg.pm.hook.register_commands.get_hookimpls():
        before = set(cli.commands)
        try:
            impl.function(*[cli for _ in impl.argnames])
        except Exception as e:
            msg = f"plugin {impl.plugin_name!r}: register_commands() raised {type(e).__name__}: {e}"
            reg.problems.append(msg)
            log.warning(msg)
            continue
        added = sorted(set(cli.commands) - before)
        for info in reg.plugins:
            if info.name == impl.plugin_name and added:
                info.registered.setdefault("command", []).extend(added)
