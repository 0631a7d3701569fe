"""Click options of the ``gpt`` commands: ``gpt run``'s made from the configs, and the shared ones.

A config field with a ``flag`` in its metadata (:mod:`gptlab.core.config`) becomes one ``gpt
run`` option: its flag, help, metavar and choices come from the field, its type from the field's
annotation; a boolean is ``--x/--no-x`` (or ``--x/OFF`` where the field names an ``off``
switch); the default is None, so the preset's value stands unless the option is given. Options
that several commands share are declared once here, as small decorators (as datasette's
``cli.py`` does).
"""

from __future__ import annotations

import functools

import attrs
import click
from click.core import ParameterSource

from gptlab.core.config import ModelConfig, TrainConfig
from gptlab.core.errors import GptlabError
from gptlab.core.plugins import Registry

CONFIGS = (ModelConfig, TrainConfig)

_TYPES = {"int": int, "float": float, "str": str}


def _compose(*decorators):
    """One decorator applying ``decorators`` so that their options show in the order given."""
    def decorate(fn):
        for d in reversed(decorators):
            fn = d(fn)
        return fn
    return decorate


def field_option(field: attrs.Attribute):
    """The click option of one config field that has a ``flag``; its parameter is the field's
    name."""
    meta = field.metadata
    kind = getattr(field.type, "__name__", field.type)
    if kind == "bool":
        off = meta.get("off", "--no-" + meta["flag"][2:])
        return click.option(f"{meta['flag']}/{off}", field.name, default=None, help=meta["help"])
    kind = click.Choice(meta["choices"]) if "choices" in meta else _TYPES[kind]
    return click.option(meta["flag"], field.name, type=kind, default=None,
                        metavar=meta.get("metavar"), help=meta["help"])


def flagged_fields(*classes) -> list[attrs.Attribute]:
    """The fields of ``classes`` that are options, in declaration order."""
    return [f for cls in classes for f in attrs.fields(cls) if f.metadata.get("flag")]


def config_options(*classes):
    """Every flagged field of ``classes`` (default: ModelConfig and TrainConfig) as an option."""
    return _compose(*(field_option(f) for f in flagged_fields(*(classes or CONFIGS))))


# ---------------------------------------------------------------- shared by several commands
def device_option(default: str | None = "cpu", help: str = "cpu, cuda, cuda:N or auto."):
    """``--device``: where the command runs."""
    return click.option("--device", default=default, show_default=default is not None,
                        help=help)


def data_option(help: str):
    """``--data PATH|NAME``: a text file or a named corpus (default: War and Peace)."""
    return click.option("--data", default=None, metavar="PATH|NAME", help=help)


checkpoint_argument = click.argument("checkpoint", default="out", type=click.Path())
"""``CHECKPOINT``: a run folder or a ``.pt`` file (default: out)."""


def _override(field: attrs.Attribute, help: str):
    return click.option(field.metadata["flag"], field.name, default=None, metavar="NAME",
                        help=help)


attention_override = _override(attrs.fields(ModelConfig).attention,
                               "Override the checkpoint's attention backend.")
kernels_override = _override(attrs.fields(ModelConfig).kernels,
                             "Override the checkpoint's layer kernels (native, torch, auto).")
matmul_override = _override(attrs.fields(ModelConfig).matmul,
                            "Override the checkpoint's matrix products (onednn, torch, auto).")


# ---------------------------------------------------------------- gpt run
#: ``gpt run``'s options that are not settings: --resume takes them along.
_RUN_ONLY = ("data", "out_dir", "resume_dir", "overwrite")

run_options = _compose(
    click.option("--preset", default="default", show_default=True,
                 help="Named starting point: bigram, tiny, default or speedrun (see `gpt "
                      "presets`); the options below override single fields."),
    data_option("UTF-8 text file to train on, or a named corpus. Default: War and Peace, from "
                "$GPTLAB_DATA_DIR or the cache (downloaded on first use)."),
    config_options(ModelConfig, TrainConfig),
    click.option("--out-dir", default="out", show_default=True,
                 type=click.Path(file_okay=False),
                 help="Run folder: ckpt.pt (latest, resumable), best.pt (lowest val loss), "
                      "metrics.jsonl."),
    click.option("--resume", "resume_dir", default=None, type=click.Path(file_okay=False),
                 help="Continue the run saved in this folder bit-exactly (model, optimizer, "
                      "schedule, RNG, data position); settings come from its checkpoint, except "
                      "--lr, which may change (e.g. lower, after a divergence)."),
    click.option("--overwrite", is_flag=True,
                 help="Replace the run already in --out-dir: its ckpt.pt, best.pt and "
                      "metrics.jsonl are deleted once the new run has written its first "
                      "checkpoint (put back if it stops before). Without it such a folder is "
                      "refused."),
)
"""``gpt run``'s options: --preset, --data, one per config field with a flag, --out-dir,
--resume and --overwrite."""


def given(ctx: click.Context, name: str) -> bool:
    """Whether the parameter ``name`` was given on the command line."""
    return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE


def command_line(ctx: click.Context) -> str:
    """The command as given: ``gpt bench attention --seq-lens 64,128`` (the options given on
    the command line, in the command's order), to head the files it writes."""
    words = ["gpt", *ctx.command_path.split()[1:]]  # the root is `gpt`, whatever it was run as
    for p in ctx.command.params:
        if not given(ctx, p.name):
            continue
        value = ctx.params[p.name]
        if isinstance(p, click.Argument):
            words.append(str(value))
        elif getattr(p, "is_flag", False) and isinstance(value, bool):
            words.append(p.opts[0] if value else p.secondary_opts[0])
        else:
            words += [p.opts[0], f"{value:g}" if isinstance(value, float) else str(value)]
    return " ".join(words)


def resume_conflicts(ctx: click.Context) -> list[str]:
    """The options given with --resume that it cannot take: every setting (the preset, each
    config field) but those marked ``resumable`` (--lr)."""
    fields = {f.name: f for f in flagged_fields(*CONFIGS)}
    return [p.opts[0] for p in ctx.command.params
            if p.name not in _RUN_ONLY and given(ctx, p.name)
            and not (p.name in fields and fields[p.name].metadata.get("resumable"))]


# ---------------------------------------------------------------- the registry
def registry(ctx: click.Context) -> Registry:
    """The plugin registry the ``gpt`` group loaded (its load error, raised, if it failed)."""
    reg = ctx.find_root().meta.get("gptlab.registry")
    if isinstance(reg, GptlabError):
        raise reg
    return reg


def pass_registry(fn):
    """Pass the registry as the command's first argument (as ``click.pass_obj`` does)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(registry(click.get_current_context()), *args, **kwargs)
    return wrapper
