"""Plugin loading and the component registry.

:func:`load_registry` builds a fresh pluggy ``PluginManager`` (nothing happens at import time),
loads every ``gptlab`` entry point one by one, gptlab's own (distribution ``gptlab``) first,
calls each plugin's ``register_*`` hooks separately and indexes the returned classes by name;
:func:`register_commands` adds the plugins' subcommands. Everything a plugin's code does runs
inside one containment (:func:`_contained`): a plugin that fails to import, that pluggy refuses
to register (a hook function whose argument names the hook does not have), or whose hook raises
(``SystemExit`` included; Ctrl-C is not caught), a bad return value, an entry point whose name
is taken (a built-in always keeps its name) and a command whose name is taken (the original is
kept) each become one line in ``Registry.problems`` naming the plugin, and everything else
keeps working. Nothing is logged here: the CLI shows the problems. Two plugins
registering the same component name is a :class:`~gptlab.core.errors.PluginError` naming both.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import traceback
from collections.abc import Iterable

import attrs
import pluggy

from gptlab.core import hookspecs
from gptlab.core.attention import AttentionBackend
from gptlab.core.devices import AUTO
from gptlab.core.errors import PluginError, UnknownComponentError
from gptlab.core.interfaces import (Block, Decoder, FeedForward, LanguageModel, Norm,
                                    PositionScheme, Tokenizer)
from gptlab.core.layer_kernels import LayerKernels
from gptlab.core.matmuls import Matmul
from gptlab.core.optimizers import OptimizerRecipe

ENTRY_POINT_GROUP = "gptlab"
BUILTIN_DIST = "gptlab"  # the distribution whose entry points are gptlab's own plugins


@attrs.frozen
class Kind:
    """One kind of component: the hook that registers it, the registry table holding it, its
    base class, how messages name it, and (for implementations chosen by
    :func:`gptlab.core.selection.select`) the flag that names one and what to do when ``auto``
    finds none."""

    hook: str
    table: str
    base: type
    label: str
    flag: str | None = None
    auto_fix: str = ""


KINDS = {k.table: k for k in [
    Kind("register_tokenizers", "tokenizers", Tokenizer, "tokenizer"),
    Kind("register_models", "models", LanguageModel, "model"),
    Kind("register_blocks", "blocks", Block, "block"),
    Kind("register_attention_backends", "attention_backends", AttentionBackend,
         "attention backend", "--attention",
         "change the request (device, dropout, head dim) or install a backend that fits"),
    Kind("register_layer_kernels", "layer_kernels", LayerKernels, "layer kernels", "--kernels"),
    Kind("register_matmuls", "matmuls", Matmul, "matmul", "--matmul"),
    Kind("register_decoders", "decoders", Decoder, "decoder"),
    Kind("register_norms", "norms", Norm, "norm"),
    Kind("register_mlps", "mlps", FeedForward, "MLP"),
    Kind("register_positions", "positions", PositionScheme, "position scheme"),
    Kind("register_optimizers", "optimizers", OptimizerRecipe, "optimizer"),
]}


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
    layer_kernels: dict[str, type] = attrs.Factory(dict)
    matmuls: dict[str, type] = attrs.Factory(dict)
    decoders: dict[str, type] = attrs.Factory(dict)
    norms: dict[str, type] = attrs.Factory(dict)
    mlps: dict[str, type] = attrs.Factory(dict)
    positions: dict[str, type] = attrs.Factory(dict)
    optimizers: dict[str, type] = attrs.Factory(dict)
    owners: dict[tuple[str, str], str] = attrs.Factory(dict)  # (kind, name) -> plugin
    problems: list[str] = attrs.Factory(list)  # one line per broken or refused plugin part

    def add_problem(self, problem: str) -> None:
        """Record ``problem`` once (each CLI built from this registry meets its command
        problems again)."""
        if problem not in self.problems:
            self.problems.append(problem)

    def kind(self, kind: str) -> Kind:
        """What the registry knows of a kind (a table name: ``attention_backends``, ...)."""
        return KINDS[kind]

    def get(self, kind: str, name: str) -> type:
        """The class registered as ``name``; else a one-line error listing the names (and
        ``auto`` where the kind is chosen by a flag)."""
        table = getattr(self, kind)
        if name not in table:
            info = KINDS[kind]
            names = [AUTO] * bool(info.flag) + sorted(table)
            raise UnknownComponentError(
                f"unknown {info.label} {name!r}; available: {', '.join(names) or 'none'}")
        return table[name]

    def tokenizer(self, name: str) -> type:
        return self.get("tokenizers", name)

    def model(self, name: str) -> type:
        return self.get("models", name)

    def block(self, name: str) -> type:
        return self.get("blocks", name)

    def attention_backend(self, name: str) -> type:
        return self.get("attention_backends", name)

    def layer_kernel(self, name: str) -> type:
        return self.get("layer_kernels", name)


def plugin_part_in(reg: Registry, error: BaseException) -> str | None:
    """Which plugin's part raised ``error`` (``"plugin 'p': norm 'x'"``), found in its
    traceback: the innermost frame in the file of a class a plugin outside gptlab registered;
    None if no plugin's code is on the way."""
    files = {}
    for (kind, name), plugin in reg.owners.items():
        cls = getattr(reg, kind).get(name)
        if cls is None or cls.__module__.split(".")[0] == "gptlab":
            continue
        try:
            path = inspect.getsourcefile(cls)
        except TypeError:
            continue
        if path:
            files.setdefault(os.path.realpath(path), f"plugin {plugin!r}: "
                                                    f"{KINDS[kind].label} {name!r}")
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if (part := files.get(os.path.realpath(frame.filename))) is not None:
            return part
    return None


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    return pm


def describe(e: BaseException) -> str:
    """One line: the exception's type and message (its lines joined)."""
    try:
        text = "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
    except Exception:
        text = ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _contained(problems: list[str], problem: str, fn):
    """``(True, fn())``, or ``(False, None)`` with ``problem`` and what ``fn`` raised appended
    to ``problems``: the one containment of a plugin's code (its import, its registration, its
    hooks). Ctrl-C is not caught; SystemExit is (a plugin must not end gptlab)."""
    try:
        return True, fn()
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        line = f"{problem} {describe(e)}"
        if line not in problems:
            problems.append(line)
        return False, None


def _register(pm: pluggy.PluginManager, plugin, name: str) -> None:
    """``pm.register``, leaving nothing of the plugin behind if pluggy refuses it."""
    try:
        pm.register(plugin, name=name)
    except BaseException:
        if pm.has_plugin(name):
            pm.unregister(name=name)
        raise


def _is_builtin(ep: importlib.metadata.EntryPoint) -> bool:
    return ep.dist is not None and ep.dist.name == BUILTIN_DIST


def _load_entry_points(pm: pluggy.PluginManager, problems: list[str]) -> dict[str, str]:
    """Register every entry point, gptlab's own first: a later one whose name is taken is
    skipped (so a third party can never replace a built-in). Returns name -> source."""
    sources, holders = {}, {}
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for ep in sorted(eps, key=lambda ep: not _is_builtin(ep)):
        where = f"{ep.value} ({ep.dist.name} {ep.dist.version})" if ep.dist else ep.value
        if ep.name in holders:
            problems.append(f"plugin {ep.name!r} ({where}) skipped: the name is already taken "
                            f"by {holders[ep.name]}")
            continue
        holders[ep.name] = "gptlab's own plugin" if _is_builtin(ep) else where
        ok, plugin = _contained(problems, f"plugin {ep.name!r} ({where}) failed to import:",
                                ep.load)
        if not ok:
            continue
        ok, _ = _contained(problems, f"plugin {ep.name!r} ({where}) cannot be registered "
                                     f"(ignored):", lambda: _register(pm, plugin, ep.name))
        if ok:
            sources[ep.name] = f"entry point {where}"
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
        _contained(reg.problems, f"plugin {name!r} (in-process) cannot be registered (ignored):",
                   lambda: _register(pm, plugin, name))
        sources[name] = "in-process"
    infos = {name: PluginInfo(name, sources.get(name, "in-process"))
             for name, _ in pm.list_name_plugin()}
    reg.plugins = list(infos.values())

    for info in KINDS.values():
        hook_name, kind, base, label = info.hook, info.table, info.base, info.label
        table = getattr(reg, kind)
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin = impl.plugin_name
            ok, classes = _contained(reg.problems, f"plugin {plugin!r}: {hook_name}() raised",
                                     lambda: _as_list(impl.function()))
            if not ok:
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
    return reg


def register_commands(reg: Registry, cli) -> None:
    """Let every plugin add subcommands to ``cli``. A hook that raises, or a command whose name
    is taken (gptlab's own or an earlier plugin's), becomes a problem entry; the original stays."""
    owners = dict.fromkeys(cli.commands, "gptlab's own")
    infos = {info.name: info for info in reg.plugins}
    for impl in reg.pm.hook.register_commands.get_hookimpls():
        plugin = impl.plugin_name
        before = dict(cli.commands)
        _contained(reg.problems, f"plugin {plugin!r}: register_commands() raised",
                   lambda: impl.function(*[cli for _ in impl.argnames]))
        for name, cmd in before.items():
            if cli.commands.get(name) is not cmd:  # replaced (or removed): put the original back
                reg.add_problem(f"plugin {plugin!r}: command {name!r} is already "
                                f"{owners[name]}; ignored")
                cli.commands[name] = cmd
        added = [name for name in cli.commands if name not in before]
        owners.update(dict.fromkeys(added, f"registered by plugin {plugin!r}"))
        if added and plugin in infos:
            names = infos[plugin].registered.setdefault("command", [])
            names.extend(name for name in added if name not in names)
