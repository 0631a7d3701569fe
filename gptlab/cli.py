"""The ``gpt`` command line: train (``run``), ``sample``, ``eval``, ``plot``, inspect
``plugins``/``backends``/``presets``, and ``bench``.

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
from gptlab.core.config import DTYPES
from gptlab.core.errors import GptlabError, PluginError
from gptlab.core.plugins import Registry, load_registry, register_commands


class GptGroup(click.Group):
    """A click group that turns gptlab errors into one-line messages."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GptlabError as e:
            exc = click.ClickException(str(e))
            exc.exit_code = getattr(e, "exit_code", 1)  # e.g. 130 after Ctrl-C
            raise exc from None


_registry = options.registry  # plugin commands import it from here


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

    def say(*args, **kwargs):  # only rank 0 prints
        if main:
            click.echo(*args, **kwargs)

    reg = options.registry(ctx)
    if resume_dir is not None and (given := options.resume_conflicts(ctx)):
        raise click.UsageError(f"--resume takes every setting but --lr from the checkpoint; "
                               f"drop {', '.join(given)}")
    setup = run_settings(preset, settings, data=data, resume_dir=resume_dir,
                         out_dir=out_dir if options.given(ctx, "out_dir") else None)
    tc = setup.train_config
    if setup.resume:
        state = setup.resume.train_state
        note = ("" if setup.old_learning_rate is None else
                f" with --lr {tc.learning_rate:g} (was {setup.old_learning_rate:g})")
        say(f"resuming {resume_dir} at step {state.step if state else None}/{tc.max_iters}"
            f"{note}", err=True)
    session = Session(reg, setup, overwrite=overwrite)
    world = session.world
    progress, close = console.download_progress() if world.is_main else (None, lambda: None)
    try:
        text = session.load_text(progress)
    finally:
        close()
    say(f"data: {session.data_path} ({len(text):,} chars)", err=True)
    shown = console.TrainingProgress(tc.max_iters, tc.time_budget) if world.is_main else None
    try:
        trainer = session.trainer(text, on_event=shown)
        for note in trainer.notes:
            say(f"note: {note}", err=True)
        used, T = trainer.cfg, setup.model_config.block_size
        say(f"batch: {used.batch_size} sequences x {used.grad_accum} micro-batches x "
            f"{world.size} process{'es' if world.size > 1 else ''} = "
            f"{used.batch_size * trainer.micro_batches} sequences of {T} tokens per step "
            f"({used.dtype}{', compiled' if used.compile else ''})", err=True)
        result = trainer.fit()
    finally:
        if shown is not None:
            shown.close()
    if not world.is_main:
        return
    mc = result.model_config
    attn = f", attention {result.attention}" if result.attention else ""
    click.echo(f"model: {mc.model} ({result.model.num_parameters() / 1e6:.2f}M parameters"
               f"{attn}), vocab {mc.vocab_size}")
    click.echo(f"train loss {result.train_loss:.4f} | val loss {result.val_loss:.4f} | "
               f"{console.fmt_time(result.elapsed)} | {result.tokens_per_s:,.0f} tok/s")
    click.echo(f"checkpoint: {result.checkpoint}")
    if tc.sample_tokens:
        text = sample_text(result.model, result.tokenizer, "", tc.sample_tokens, seed=tc.seed)
        click.echo("--- sample ---")
        click.echo(text)


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
@options.pass_registry
def sample(reg, checkpoint, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop,
           cache, stream, device, attention, kernels):
    """Generate text from a CHECKPOINT (a run folder or a .pt file; default: out)."""
    from gptlab.core.checkpoint import load_model
    from gptlab.core.devices import resolve_device
    from gptlab.core.generation import check_sampling, sample_text

    check_sampling(temperature, top_k, top_p, seed)  # before anything is loaded or printed
    model, tokenizer, _ = load_model(reg, checkpoint, resolve_device(device), attention=attention,
                                     kernels=kernels)
    tokenizer.encode(prompt)  # unknown characters fail before anything is printed
    if stream:
        click.echo(prompt, nl=False)
    text = sample_text(model, tokenizer, prompt, max_new_tokens, temperature=temperature,
                       top_k=top_k, top_p=top_p, seed=seed, stop=stop, use_cache=cache,
                       on_text=(lambda t: click.echo(t, nl=False)) if stream else None)
    click.echo("" if stream else text)


@click.command("eval")
@options.checkpoint_argument
@options.data_option("Text to evaluate on (default: the one the checkpoint was trained on).")
@click.option("--split", type=click.Choice(["val", "train"]), default="val", show_default=True,
              help="Which split of the text to evaluate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Windows of block_size tokens per forward pass.")
@options.device_option()
@options.kernels_override
@options.pass_registry
def eval_cmd(reg, checkpoint, data, split, batch_size, device, kernels):
    """Loss, perplexity and bits per character over the WHOLE split (deterministic)."""
    import math

    from gptlab.core.checkpoint import load_model
    from gptlab.core.devices import resolve_device
    from gptlab.core.evaluation import evaluate_split
    from gptlab.data.batches import encode_splits
    from gptlab.data.corpora import load_text, resolve_corpus

    model, tokenizer, ckpt = load_model(reg, checkpoint, resolve_device(device), kernels=kernels)
    tc = ckpt.train_config
    source = data or (ckpt.train_state.data_source if ckpt.train_state else None)
    path = resolve_corpus(source)
    text = load_text(path)
    splits = encode_splits(text, tokenizer, tc.val_fraction, model.config.block_size)
    ids = splits.val if split == "val" else splits.train
    loss, count = evaluate_split(model, ids, batch_size=batch_size)
    chars = len(tokenizer.decode(ids[1:].tolist()))  # characters of the predicted tokens
    bpc = loss * count / math.log(2) / chars
    click.echo(f"{split} split of {path}: {count:,} predicted tokens")
    click.echo(f"loss {loss:.4f} | perplexity {math.exp(loss):.3f} | bits/char {bpc:.4f}")


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True,
                                                                     file_okay=False))
@click.option("--out", "out_path", default="loss.png", show_default=True,
              type=click.Path(dir_okay=False), help="PNG file to write.")
def plot(run_dirs, out_path):
    """Draw the train/val loss curves of one or more RUN_DIRS into a PNG."""
    from gptlab.plot import plot_runs

    path = plot_runs(run_dirs, out_path)
    click.echo(f"wrote {path}")


# --------------------------------------------------------------------------- introspection
@click.command()
@options.pass_registry
def plugins(reg):
    """List installed plugins and what each registers."""
    for info in reg.plugins:
        click.echo(f"{info.name}  ({info.source})")
        if not info.registered:
            click.echo("    (registers nothing)")
        for kind, names in info.registered.items():
            click.echo(f"    {kind}: {', '.join(names)}")
    for problem in reg.problems:
        click.echo(f"WARNING: {problem}")


@click.command()
@options.device_option(help="Device type to check for.")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "float64", "float16", "bfloat16"]),
              help="dtype of the request's q, k, v (and of the layer kernels' activations).")
@click.option("--head-dim", type=click.IntRange(min=1), default=32, show_default=True,
              help="Head dimension of the request.")
@click.option("--seq-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="Query and key length of the request.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              show_default=True, help="Attention dropout probability of the request.")
@click.option("--inference", is_flag=True, help="Forward only (no backward needed).")
@options.pass_registry
def backends(reg, device, dtype, head_dim, seq_len, dropout, inference):
    """List attention backends and layer kernels, best first, with why each can or cannot
    run."""
    import torch

    from gptlab.core.attention import AttentionRequest
    from gptlab.core.layer_kernels import KernelRequest
    from gptlab.core.devices import device_type, device_unavailable_reason
    from gptlab.core.dispatch import backend_table

    dev = device_type(device)
    request = AttentionRequest(device=dev, dtype=getattr(torch, dtype), head_dim=head_dim,
                               q_len=seq_len, k_len=seq_len, dropout_p=dropout,
                               requires_grad=not inference)
    rows = backend_table(reg, request)
    missing = device_unavailable_reason(dev)
    if missing:
        click.echo(f"note: {dev} is not available on this machine: {missing}")
    _show_table(rows, request)
    if sum(not r for _, r in rows) > 1:
        click.echo("(auto here: the highest priority; `gpt run` times the available ones on "
                   "its shape and takes the fastest, see GPTLAB_AUTO in the README)")
    kernel_request = KernelRequest(device=dev, dtype=getattr(torch, dtype))
    click.echo(f"layer kernels (--kernels; {kernel_request.describe()}):")
    _show_table(backend_table(reg, kernel_request, kind="layer_kernels"), kernel_request)


def _show_table(rows, request) -> None:
    """One line per backend (priority for the request, available, which auto takes), then its
    reasons."""
    from gptlab.core.dispatch import priority_of

    auto = next((cls.name for cls, r in rows if not r), None)
    for cls, reasons in rows:
        mark = "yes" if not reasons else "no "
        pick = "  <- auto" if cls.name == auto else ""
        click.echo(f"{cls.name:<10} priority {priority_of(cls, request):>3}  available: "
                   f"{mark}{pick}")
        if cls.description:
            click.echo(f"    {cls.description}")
        for r in reasons:
            click.echo(f"    - {r}")


@click.command()
def presets():
    """List the named presets and their settings."""
    from gptlab.core.config import PRESETS

    for p in PRESETS.values():
        click.echo(f"{p.name}: {p.description}")
        settings = {**p.model, **p.train}
        click.echo("    " + ", ".join(f"{k}={v}" for k, v in settings.items()))


@click.group()
def bench():
    """Benchmarks (ratios against a baseline measured in the same run)."""


@bench.command("attention")
@click.option("--backends", "names", default=None,
              help="Comma-separated backends (default: every one that runs on the CPU).")
@click.option("--seq-lens", default="64,256,1024,2048", show_default=True,
              help="Comma-separated sequence lengths T.")
@click.option("--batch", "B", type=click.IntRange(min=1), default=8, show_default=True,
              help="Batch size B.")
@click.option("--heads", "H", type=click.IntRange(min=1), default=4, show_default=True,
              help="Heads H.")
@click.option("--head-dim", "D", type=click.IntRange(min=1), default=32, show_default=True,
              help="Head dimension D.")
@click.option("--reps", type=click.IntRange(min=1), default=None,
              help="Timed repetitions per point (default 5, 3 for T >= 2048).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, or cuda / cuda:N (times bracketed by synchronize, memory from "
                   "torch.cuda.max_memory_allocated).")
@click.option("--dtype", type=click.Choice(DTYPES),
              default="float32", show_default=True,
              help="dtype of q, k, v (the tensor-core backends take bfloat16 and float16).")
@click.pass_context
def bench_attention(ctx, names, seq_lens, B, H, D, reps, device, dtype):
    """Causal forward+backward time and peak extra memory per backend and T, vs sdpa."""
    import torch

    from gptlab.bench import attention as benchmod
    from gptlab.core.attention import AttentionRequest
    from gptlab.core.devices import resolve_device
    from gptlab.core.dispatch import backend_table

    reg = _registry(ctx)
    dev = resolve_device(device)
    skipped = []
    if names:
        chosen = [n.strip() for n in names.split(",") if n.strip()]
        for n in chosen:
            reg.attention_backend(n)
    else:
        req = AttentionRequest(device=dev.type, dtype=getattr(torch, dtype), head_dim=D)
        table = backend_table(reg, req)
        chosen = sorted(cls.name for cls, reasons in table if not reasons)
        # those made for this device that cannot run here (a missing compiler, a driver too old
        # for nvcc's CUDA): said once, not left out silently
        skipped = [(cls.name, reasons) for cls, reasons in table
                   if reasons and dev.type in cls.devices]
    chosen = ["sdpa", *(n for n in chosen if n != "sdpa")]  # the baseline first
    try:
        lens = [int(t) for t in seq_lens.split(",")]
    except ValueError:
        lens = []
    if not lens or min(lens) < 1:
        raise click.BadParameter("comma-separated integers >= 1", param_hint="--seq-lens")
    where = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    click.echo(f"causal attention forward+backward, B={B} H={H} D={D}, {dtype}, {dev}, {where}")
    for name, reasons in skipped:
        click.echo(f"{name}: not run: {'; '.join(reasons)}")
    click.echo(f"{'backend':<10}{'T':>6}{'time ms':>11}{'x sdpa':>8}{'peak MiB':>11}{'x sdpa':>8}")
    pending = []

    def show(point):
        pending.append(point)
        if point.backend != chosen[-1]:
            return
        base = next((p for p in pending if p.backend == "sdpa"), None)
        for p in pending:
            if p.error:
                click.echo(f"{p.backend:<10}{p.T:>6}  error: {p.error}")
                continue
            rt = f"{p.time_ms / base.time_ms:.2f}" if base and base.time_ms else "-"
            mem = f"{p.peak_extra_mib:.1f}" if p.peak_extra_mib is not None else "n/a"
            rm = (f"{p.peak_extra_mib / base.peak_extra_mib:.2f}"
                  if base and base.peak_extra_mib and p.peak_extra_mib is not None else "-")
            click.echo(f"{p.backend:<10}{p.T:>6}{p.time_ms:>11.2f}{rt:>8}{mem:>11}{rm:>8}")
        pending.clear()

    benchmod.run(chosen, lens, B=B, H=H, D=D, reps=reps, device=str(dev), dtype=dtype,
                 on_point=show)


@bench.command("train")
@click.option("--preset", default="default", show_default=True, help="The model and batch.")
@click.option("--variants", default="float32,float32+compile,bfloat16,bfloat16+compile",
              show_default=True,
              help="Comma-separated DTYPE[+compile][@BACKEND][/KERNELS], or peer[+compile] "
                   "(needs --peer); the first is the baseline.")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Optimiser steps per variant per round.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Interleaved rounds (the median is reported).")
@click.option("--warmup", type=click.IntRange(min=1), default=3, show_default=True,
              help="Untimed steps first (they include compilation).")
@click.option("--data", default=None, metavar="PATH|NAME",
              help="Text to train on (default: War and Peace).")
@click.option("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the "
                                             "preset's, cpu).")
@click.option("--peer", default=None, metavar="PATH", type=click.Path(dir_okay=False),
              help="nanoGPT's model.py (not shipped): adds a 'peer' variant, the same model "
                   "written by nanoGPT, and a column of ratios to it.")
@click.pass_context
def bench_train(ctx, preset, variants, steps, rounds, warmup, data, device, peer):
    """Training tokens/s of whole optimiser steps, per variant, as ratios to the first variant
    measured in the same run (interleaved rounds, same batches)."""
    import torch

    from gptlab.bench import train as bt
    from gptlab.data.corpora import load_text, resolve_corpus

    reg = _registry(ctx)
    chosen = [bt.Variant.parse(v.strip()) for v in variants.split(",") if v.strip()]
    if peer and not any(v.peer for v in chosen):
        chosen.append(bt.Variant.parse("peer"))
    text = load_text(resolve_corpus(data))
    click.echo(f"training steps of --preset {preset}, {torch.get_num_threads()} threads, torch "
               f"{torch.__version__}; {rounds} rounds x {steps} steps, median", err=True)
    results = bt.run(reg, text, chosen, preset=preset, steps=steps, rounds=rounds,
                     warmup=warmup, device=device, peer=peer,
                     on_progress=lambda m: click.echo(f"  {m}", err=True))
    base = results[0].median
    peer_speed = next((r.median for r in results if r.variant.name == "peer"), None)
    click.echo(f"{'variant':<28}{'attention':<11}{'kernels':<9}{'tokens/s':>10}{'x base':>8}"
               + (f"{'x peer':>8}" if peer_speed else ""))
    for r in results:
        click.echo(f"{r.variant.name:<28}{r.attention or '-':<11}{r.kernels or '-':<9}"
                   f"{r.median:>10,.0f}"
                   f"{r.median / base:>8.2f}"
                   + (f"{r.median / peer_speed:>8.2f}" if peer_speed else ""))


@bench.command("generate")
@click.argument("checkpoint", default="out", type=click.Path())
@click.option("--tokens", type=click.IntRange(min=1), default=500, show_default=True,
              help="Tokens to generate, with and without the cache.")
@click.option("--prompt", default="", help="Prompt (default: start from token 0).")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Interleaved rounds (without, then with the cache); medians are reported.")
@click.pass_context
def bench_generate(ctx, checkpoint, tokens, prompt, rounds):
    """Greedy generation speed with and without the KV cache, and whether outputs match."""
    import statistics
    import time

    import torch

    from gptlab.core.checkpoint import load_model

    model, tokenizer, _ = load_model(_registry(ctx), checkpoint)
    ids = tokenizer.encode(prompt) if prompt else [0]
    idx = torch.tensor([ids], dtype=torch.long)
    outs, speeds = [], {False: [], True: []}
    for r in range(rounds):
        for use_cache in (False, True):
            t0 = time.perf_counter()
            outs.append(model.generate(idx, tokens, temperature=0, use_cache=use_cache))
            speeds[use_cache].append(tokens / (time.perf_counter() - t0))
        click.echo(f"  round {r + 1}/{rounds}: {speeds[False][-1]:,.1f} and "
                   f"{speeds[True][-1]:,.1f} tok/s", err=True)
    same = all(torch.equal(outs[0], o) for o in outs)
    off, on = statistics.median(speeds[False]), statistics.median(speeds[True])
    click.echo(f"without cache: {off:,.1f} tok/s")
    click.echo(f"with cache:    {on:,.1f} tok/s  ({on / off:.1f}x)  (medians of {rounds} "
               f"interleaved rounds)")
    click.echo(f"greedy outputs identical: {'yes' if same else 'NO'} ({tokens} tokens)")


BUILTIN_COMMANDS = [run, sample, eval_cmd, plot, plugins, backends, presets, bench]


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
                click.echo(f"WARNING: {problem}", err=True)

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
