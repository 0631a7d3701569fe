"""The ``gpt`` command line: train (``run``), ``sample``, ``eval``, ``plot``, inspect
``plugins``/``backends``/``presets``, ``bench``, and the lab's ``ladder`` and ``attention``.

This is the only layer that prints (:mod:`gptlab.console` shows progress); the options come from
:mod:`gptlab.options` (``gpt run``'s from the configs' fields). Every
:class:`~gptlab.core.errors.GptlabError` is shown as one ``Error: ...`` line with exit code 1,
never as a traceback. Plugins add subcommands through the ``register_commands(cli)`` hook; a
plugin that fails is reported as a warning and the rest of the CLI keeps working.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import click

# torch warns on import when NumPy is absent; gptlab never needs NumPy. Filter before importing it.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from gptlab import __version__, console, options
from gptlab.bench.commands import bench
from gptlab.core.errors import GptlabError, Interrupted, PluginError, command, printable
from gptlab.core.plugins import Registry, load_registry, register_commands
from gptlab.lab.commands import attention, ladder


class GptGroup(click.Group):
    """A click group that turns gptlab errors, and Ctrl-C, into one-line messages (exit code 1,
    or 130 and 143 after a signal), every character shown printable."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GptlabError as e:
            raise _one_line(e) from None
        except KeyboardInterrupt:  # not click's "Aborted!" and exit code 1
            raise _one_line(Interrupted("interrupted")) from None


def _one_line(e: GptlabError) -> click.ClickException:
    exc = click.ClickException(printable(str(e)))
    exc.exit_code = getattr(e, "exit_code", 1)  # e.g. 130 after Ctrl-C
    return exc


# --------------------------------------------------------------------------- run
@click.command()
@options.run_options
@click.pass_context
def run(ctx, preset, data, out_dir, resume_dir, overwrite, **settings):
    """Train a model on War and Peace (or --data), evaluate it, save it and print a sample.

    Ctrl-C or SIGTERM saves a checkpoint first (after the current step, or at once during an
    evaluation); continue with --resume. A run folder that already holds a run is refused
    unless --resume or --overwrite. Under torchrun (`torchrun --nproc-per-node=N -m gptlab run
    ...`) the N processes train one model with DistributedDataParallel; rank 0 writes and
    prints.
    """
    from gptlab.core import distributed

    try:
        _run(ctx, preset, data, out_dir, resume_dir, overwrite, settings)
    except GptlabError as e:
        if distributed.is_main_process():
            raise
        # rank 0 reports what every rank met (a bad option, a signal); a failure of this
        # rank's own (it could not join, a peer died) is said with its rank
        if isinstance(e, distributed.DistributedError):
            raise type(e)(f"[rank {os.environ.get('RANK')}] {e}") from None
        ctx.exit(getattr(e, "exit_code", 1))
    finally:
        distributed.shutdown()


def _run(ctx, preset, data, out_dir, resume_dir, overwrite, settings):
    from gptlab.core import distributed
    from gptlab.core.generation import sample_text
    from gptlab.core.session import Session, run_settings

    main = distributed.is_main_process()  # under torchrun: the group is joined further down

    def say(line: str, **kwargs):  # only rank 0 prints; paths and notes shown printable
        if main:
            click.echo(printable(line), **kwargs)

    reg = options.registry(ctx)
    if resume_dir is not None and (given := options.resume_conflicts(ctx)):
        raise click.UsageError(f"--resume takes every setting but --lr from the checkpoint; "
                               f"drop {', '.join(given)}")
    setup = run_settings(preset, settings, data=data, resume_dir=resume_dir,
                         out_dir=out_dir if options.given(ctx, "out_dir") else None)
    tc = setup.train_config
    session = shown = None
    try:  # until training starts, Ctrl-C has nothing to save
        session = Session(reg, setup, overwrite=overwrite)
        world = session.world
        if session.finished:  # its final evaluation is saved: nothing to do, nothing written
            session.close()
            st = setup.resume.train_state
            say(f"{resume_dir} is finished (step {st.step}/{tc.max_iters}, val loss "
                f"{st.history[-1]['val_loss']:.4f}); nothing to resume: sample it with "
                f"`{command('sample', resume_dir)}`")
            return
        if setup.resume:
            state = setup.resume.train_state
            note = ("" if setup.old_learning_rate is None else
                    f" with --lr {tc.learning_rate:g} (was {setup.old_learning_rate:g})")
            say(f"resuming {resume_dir} at step {state.step if state else None}/"
                f"{tc.max_iters}{note}", err=True)
        progress, close = console.download_progress() if world.is_main else (None, lambda: None)
        try:
            text = session.load_text(progress)
        finally:
            close()
        shown = console.TrainingProgress(tc.max_iters, tc.time_budget) if world.is_main else None
        trainer = session.trainer(text, on_event=shown)
    except BaseException as e:
        if shown is not None:
            shown.close()
        if session is not None:
            session.close()  # the run folder as it was found
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted("interrupted before training started; nothing was saved") from None
        raise
    try:  # the trainer holds the run folder from here: fit() releases it, or close() below
        say(f"data: {session.data_path} ({len(text):,} chars)", err=True)
        for note in trainer.notes:
            say(f"note: {note}", err=True)
        if trainer.plan.dtype_reason:
            say(f"dtype: {trainer.cfg.dtype} ({trainer.plan.dtype_reason})", err=True)
        used, T = trainer.cfg, setup.model_config.block_size
        say(f"batch: {used.batch_size} sequences x {used.grad_accum} micro-batches x "
            f"{world.size} process{'es' if world.size > 1 else ''} = "
            f"{used.batch_size * trainer.micro_batches} sequences of {T} tokens per step "
            f"({used.dtype}{', compiled' if used.compile else ''})", err=True)
        result = trainer.fit()
    finally:
        trainer.close()
        if shown is not None:
            shown.close()
    if not world.is_main:
        return
    mc = result.model_config
    attn = f", attention {result.attention}" if result.attention else ""
    products = f", matmul {result.matmul}" if result.matmul else ""
    click.echo(f"model: {mc.model} ({result.model.num_parameters() / 1e6:.2f}M parameters"
               f"{attn}{products}), vocab {mc.vocab_size}")
    click.echo(f"train loss {result.train_loss:.4f} | val loss {result.val_loss:.4f} | "
               f"{console.fmt_time(result.elapsed)} | {result.tokens_per_s:,.0f} tok/s")
    click.echo(printable(f"checkpoint: {result.checkpoint}"))
    if tc.sample_tokens:
        text = sample_text(result.model, result.tokenizer, "", tc.sample_tokens, seed=tc.seed)
        click.echo("--- sample ---")
        console.echo_text(text)


# --------------------------------------------------------------------------- sample / eval
@click.command()
@options.checkpoint_argument
@click.option("--prompt", default="", help="Text to continue (every character must be in "
                                           "the tokenizer's vocabulary).")
@click.option("--tokens", "max_new_tokens", type=click.IntRange(min=0), default=500,
              show_default=True, help="Most tokens to generate.")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="Softmax temperature; 0 is greedy decoding.")
@click.option("--top-k", type=int, default=None, help="Sample only among the k likeliest.")
@click.option("--top-p", type=float, default=None,
              help="Nucleus sampling: only the likeliest tokens whose mass reaches p.")
@click.option("--seed", type=int, default=None, help="Seed for reproducible samples.")
@click.option("--stop", default=None, help="Stop once the generated text contains this string.")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Use the KV cache (one new token per step) where the model supports it.")
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="Print text as it is generated.")
@options.device_option()
@options.attention_override
@options.kernels_override
@options.matmul_override
@options.pass_registry
def sample(reg, checkpoint, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop,
           cache, stream, device, attention, kernels, matmul):
    """Generate text from a CHECKPOINT (a run folder or a .pt file; default: out)."""
    from gptlab.core.checkpoint import load_model
    from gptlab.core.devices import resolve_device
    from gptlab.core.generation import check_sampling, sample_text

    check_sampling(temperature, top_k, top_p, seed)  # before anything is loaded or printed
    model, tokenizer, _ = load_model(reg, checkpoint, resolve_device(device), attention=attention,
                                     kernels=kernels, matmul=matmul)
    tokenizer.encode(prompt)  # unknown characters fail before anything is printed
    if stream:
        console.echo_text(prompt, nl=False)
    try:
        text = sample_text(model, tokenizer, prompt, max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed, stop=stop, use_cache=cache,
                           on_text=(lambda t: console.echo_text(t, nl=False)) if stream
                           else None)
    except KeyboardInterrupt:
        click.echo("")  # end the streamed line: the error goes on a line of its own
        raise
    console.echo_text("" if stream else text)


@click.command("eval")
@options.checkpoint_argument
@options.data_option("Text to evaluate on (default: the one the checkpoint was trained on).")
@click.option("--split", type=click.Choice(["val", "train"]), default="val", show_default=True,
              help="Which split of the text to evaluate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Windows of block_size tokens per forward pass.")
@options.device_option()
@options.kernels_override
@options.matmul_override
@options.pass_registry
def eval_cmd(reg, checkpoint, data, split, batch_size, device, kernels, matmul):
    """Loss, perplexity and bits per character over the WHOLE split (deterministic)."""
    import math

    from gptlab.core.checkpoint import load_model
    from gptlab.core.devices import resolve_device
    from gptlab.core.evaluation import evaluate_split
    from gptlab.data.batches import encode_splits
    from gptlab.data.corpora import check_same_text, load_text, resolve_corpus, text_sha256

    model, tokenizer, ckpt = load_model(reg, checkpoint, resolve_device(device), kernels=kernels,
                                        matmul=matmul)
    tc, st = ckpt.train_config, ckpt.train_state
    source = data or (st.data_source if st else None)
    path = resolve_corpus(source)
    text = load_text(path)
    other = ""
    if st is not None and st.data_sha256 is not None:
        if data is None:  # the text the checkpoint names: it must still be that text
            check_same_text(text, st.data_sha256, st.data_source, name=str(path),
                            fix="pass --data with the text it was trained on (or with this "
                                "file, to evaluate on another text)")
        elif text_sha256(text) != st.data_sha256:
            other = " (not the text the run was trained on)"
    splits = encode_splits(text, tokenizer, tc.val_fraction, model.config.block_size)
    ids = splits.val if split == "val" else splits.train
    loss, count = evaluate_split(model, ids, batch_size=batch_size)
    chars = len(tokenizer.decode(ids[1:].tolist()))  # characters of the predicted tokens
    bpc = loss * count / math.log(2) / chars
    click.echo(printable(f"{split} split of {path}{other}: {count:,} predicted tokens"))
    click.echo(f"loss {loss:.4f} | perplexity {math.exp(loss):.3f} | bits/char {bpc:.4f}")


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True,
                                                                     file_okay=False))
@click.option("--out", "out_path", default="loss.png", show_default=True,
              type=click.Path(dir_okay=False),
              help="Image to write; its suffix names the format (.png, .pdf, .svg, ...).")
def plot(run_dirs, out_path):
    """Draw the train/val loss curves of one or more RUN_DIRS into an image (PNG, PDF, SVG,
    ... after --out's suffix)."""
    from gptlab.plot import plot_runs

    path = plot_runs(run_dirs, out_path)
    click.echo(printable(f"wrote {path}"))


# --------------------------------------------------------------------------- introspection
@click.command()
@options.pass_registry
def plugins(reg):
    """List installed plugins and what each registers."""
    for info in reg.plugins:  # every name here is the plugin's: shown printable
        click.echo(printable(f"{info.name}  ({info.source})"))
        if not info.registered:
            click.echo("    (registers nothing)")
        for kind, names in info.registered.items():
            click.echo(printable(f"    {kind}: {', '.join(names)}"))
    for problem in reg.problems:
        click.echo(printable(f"WARNING: {problem}", keep=""))


@click.command()
@options.device_option(help="Device type to check for.")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "float64", "float16", "bfloat16"]),
              help="dtype of the request's q, k, v (and of the layer kernels' and matrix "
                   "products' activations).")
@click.option("--head-dim", type=click.IntRange(min=1), default=32, show_default=True,
              help="Head dimension of the request.")
@click.option("--seq-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="Query and key length of the request.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              show_default=True, help="Attention dropout probability of the request.")
@click.option("--inference", is_flag=True, help="Forward only (no backward needed).")
@options.pass_registry
def backends(reg, device, dtype, head_dim, seq_len, dropout, inference):
    """List attention backends, layer kernels and matrix products, best first, with why each
    can or cannot run."""
    import torch

    from gptlab.core.attention import AttentionRequest
    from gptlab.core.layer_kernels import KernelRequest
    from gptlab.core.matmuls import MatmulRequest
    from gptlab.core.devices import device_type, device_unavailable_reason
    from gptlab.core.selection import candidates

    dev = device_type(device)
    request = AttentionRequest(device=dev, dtype=getattr(torch, dtype), head_dim=head_dim,
                               q_len=seq_len, k_len=seq_len, dropout_p=dropout,
                               requires_grad=not inference)
    rows = candidates(reg, "attention_backends", request)
    missing = device_unavailable_reason(dev)
    if missing:
        click.echo(f"note: {dev} is not available on this machine: {missing}")
    _show_table(rows, request)
    if sum(not r for _, r in rows) > 1:
        click.echo("(auto here: the highest priority; `gpt run` times the available backends, "
                   "and matmuls, on its shapes and takes the fastest, see GPTLAB_AUTO in the "
                   "README)")
    kernel_request = KernelRequest(device=dev, dtype=getattr(torch, dtype))
    click.echo(f"layer kernels (--kernels; {kernel_request.describe()}):")
    _show_table(candidates(reg, "layer_kernels", kernel_request), kernel_request)
    matmul_request = MatmulRequest(device=dev, dtype=getattr(torch, dtype))
    click.echo(f"matrix products of the Linear layers (--matmul; {matmul_request.describe()}):")
    _show_table(candidates(reg, "matmuls", matmul_request), matmul_request)


def _show_table(rows, request) -> None:
    """One line per backend (priority for the request, available, which auto takes), then its
    description, why its priority differs here (if it does) and its reasons."""
    from gptlab.core.selection import priority_note_of, priority_of

    auto = next((cls.name for cls, r in rows if not r and not cls.alias_of), None)
    for cls, reasons in rows:
        mark = "yes" if not reasons else "no "
        pick = "  <- auto" if cls.name == auto else ""
        click.echo(printable(f"{cls.name:<10} priority {priority_of(cls, request):>3}  "
                             f"available: {mark}{pick}"))
        if cls.description:
            click.echo(printable(f"    {cls.description}", keep=""))
        if note := priority_note_of(cls, request):
            click.echo(printable(f"    note: {note}", keep=""))
        for r in reasons:
            click.echo(printable(f"    - {r}", keep=""))


@click.command()
def presets():
    """List the named presets and their settings."""
    from gptlab.core.config import PRESETS

    for p in PRESETS.values():
        click.echo(f"{p.name}: {p.description}")
        settings = {**p.model, **p.train}
        click.echo("    " + ", ".join(f"{k}={v}" for k, v in settings.items()))


BUILTIN_COMMANDS = [run, sample, eval_cmd, plot, plugins, backends, presets, bench, ladder,
                    attention]


def build_cli(registry: Registry | None = None) -> click.Group:
    """Build a fresh ``gpt`` group: built-in commands plus plugin commands."""

    @click.group(cls=GptGroup, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="gptlab")
    @click.option("-v", "--verbose", is_flag=True, help="Log more (INFO level).")
    @click.pass_context
    def cli(ctx, verbose):
        """gptlab: build a GPT from scratch and train it on War and Peace.

        Start with `gpt run --preset tiny`, then `gpt run`.
        """
        if verbose:
            logging.getLogger("gptlab").setLevel(logging.INFO)
        ctx.meta["gptlab.registry"] = reg
        if isinstance(reg, Registry) and ctx.invoked_subcommand != "plugins":  # that lists them
            for problem in reg.problems:
                click.echo(printable(f"WARNING: {problem}", keep=""), err=True)

    for cmd in BUILTIN_COMMANDS:
        cli.add_command(cmd)
    reg: Registry | GptlabError
    if registry is not None:
        reg = registry
    else:
        try:
            reg = load_registry()
        except PluginError as e:
            reg = e
    if isinstance(reg, Registry):
        register_commands(reg, cli)
    return cli


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s",
                        stream=sys.stderr)
    return build_cli().main(args=argv, prog_name="gpt")
