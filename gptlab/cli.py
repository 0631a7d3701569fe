"""The ``gpt`` command line: train (``run``), ``sample``, and inspect ``plugins``/``backends``.

This is the only layer that prints. Every :class:`~gptlab.core.errors.GptlabError` is shown as
one ``Error: ...`` line with exit code 1, never as a traceback. Plugins add subcommands through
the ``register_commands(cli)`` hook; a plugin that fails is reported as a warning and the rest
of the CLI keeps working.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import click

# torch warns on import when NumPy is absent; gptlab never needs NumPy. Filter before importing it.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from gptlab import __version__
from gptlab.core.config import DTYPES, SCHEDULES
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


def _registry(ctx: click.Context) -> Registry:
    root = ctx.find_root()
    reg = root.meta.get("gptlab.registry")
    if isinstance(reg, GptlabError):
        raise reg
    return reg


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


# --------------------------------------------------------------------------- run
def _progress_printer(max_iters: int, budget: float = 0.0):
    """Return (on_event, close): a live bar on a terminal, periodic lines otherwise; with a
    time budget (seconds), progress is time, not steps."""
    state = {"loss": None, "tps": 0.0, "val": None}
    if budget > 0:
        return _budget_printer(budget, state)
    if sys.stderr.isatty():
        bar = click.progressbar(length=max_iters, label="training", file=sys.stderr, width=24,
                                show_pos=True, show_eta=True,
                                item_show_func=lambda _: _status(state))
        bar.__enter__()

        def on_event(ev):
            if ev.kind == "step":
                state.update(loss=ev.loss, tps=ev.tokens_per_s)
                bar.update(1, current_item=ev.step)
            else:
                state["val"] = ev.val_loss

        return on_event, lambda: bar.__exit__(None, None, None)

    every = max(1, max_iters // 10)

    def on_event(ev):
        if ev.kind == "step":
            state.update(loss=ev.loss, tps=ev.tokens_per_s)
            if ev.step % every == 0 or ev.step == 1:
                click.echo(f"step {ev.step:>6}/{max_iters}  {_status(state)}  "
                           f"[{_fmt_time(ev.elapsed)}]", err=True)
        else:
            state["val"] = ev.val_loss
            click.echo(f"step {ev.step:>6}/{max_iters}  eval: train {ev.train_loss:.4f}  "
                       f"val {ev.val_loss:.4f}", err=True)

    return on_event, lambda: None


def _budget_printer(budget: float, state: dict):
    """Progress of a --time-budget run: seconds of the budget, the step count alongside."""
    total = max(1, int(budget))
    if sys.stderr.isatty():
        bar = click.progressbar(length=total, label="training", file=sys.stderr, width=24,
                                show_eta=True, item_show_func=lambda _: _status(state))
        bar.__enter__()
        seen = {"s": 0}

        def on_event(ev):
            if ev.kind == "step":
                state.update(loss=ev.loss, tps=ev.tokens_per_s)
                now = min(total, int(ev.train_time))
                bar.update(now - seen["s"], current_item=ev.step)
                seen["s"] = now
            else:
                state["val"] = ev.val_loss

        return on_event, lambda: bar.__exit__(None, None, None)

    mark = {"next": 0.0}

    def on_event(ev):
        if ev.kind == "step":
            state.update(loss=ev.loss, tps=ev.tokens_per_s)
            if ev.train_time >= mark["next"] or ev.step == 1:
                mark["next"] = ev.train_time + budget / 10
                click.echo(f"step {ev.step:>6}  {_status(state)}  [{_fmt_time(ev.train_time)} "
                           f"of {_fmt_time(budget)} of steps, {_fmt_time(ev.elapsed)} in all]",
                           err=True)
        else:
            state["val"] = ev.val_loss
            click.echo(f"step {ev.step:>6}  eval: train {ev.train_loss:.4f}  "
                       f"val {ev.val_loss:.4f}", err=True)

    return on_event, lambda: None


def _status(state) -> str:
    if state["loss"] is None:
        return ""
    s = f"loss {state['loss']:.3f}  {state['tps']:,.0f} tok/s"
    return s + (f"  val {state['val']:.3f}" if state["val"] is not None else "")


def _download_progress():
    bars = {}

    def progress(done, total):
        if "bar" not in bars:
            bars["bar"] = click.progressbar(length=total or 3_300_000,
                                            label="downloading War and Peace", file=sys.stderr)
            bars["bar"].__enter__()
            bars["done"] = 0
        bars["bar"].update(done - bars["done"])
        bars["done"] = done

    def close():
        if "bar" in bars:
            bars["bar"].__exit__(None, None, None)

    return progress, close


@click.command()
@click.option("--preset", default="default", show_default=True,
              help="Named starting point: bigram, tiny, default or speedrun (see `gpt "
                   "presets`); the options below override single fields.")
@click.option("--data", default=None, metavar="PATH|NAME",
              help="UTF-8 text file to train on, or a named corpus. Default: War and Peace, "
                   "from $GPTLAB_DATA_DIR or the cache (downloaded on first use).")
@click.option("--model", default=None, help="Model plugin: bigram or transformer.")
@click.option("--tokenizer", default=None, help="Tokenizer plugin (default: char).")
@click.option("--attention", default=None, metavar="NAME",
              help="Attention backend: auto picks the fastest on this machine for the run's "
                   "shape (measured once, remembered); see `gpt backends`. A named backend "
                   "that cannot run is an error.")
@click.option("--kernels", default=None, metavar="NAME",
              help="Layer kernels for LayerNorm, bias+GELU and the loss: native (C/CUDA), "
                   "torch (hand-written PyTorch) or auto (native where it runs); see "
                   "`gpt backends`.")
@click.option("--block", default=None, help="Transformer block plugin: prenorm or postnorm.")
@click.option("--norm", default=None, metavar="NAME",
              help="Norm of the blocks and the final norm: layernorm (default) or rmsnorm, or a "
                   "plugin's (see `gpt plugins`).")
@click.option("--mlp", default=None, metavar="NAME",
              help="MLP of the blocks: gelu (default), relu2 or swiglu, or a plugin's.")
@click.option("--position", default=None, metavar="NAME",
              help="Position scheme: learned (a table, default), rotary (on q and k) or none, "
                   "or a plugin's.")
@click.option("--qk-norm/--no-qk-norm", "qk_norm", default=None,
              help="RMS-normalise each head's queries and keys before their dot product.")
@click.option("--untied-head/--tied-head", "untied_head", default=None,
              help="An output head of its own instead of the token embedding's weight.")
@click.option("--zero-init/--no-zero-init", "zero_init", default=None,
              help="Start every residual projection (and an untied head) at zero.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N or auto (default: cpu).")
@click.option("--seed", type=int, default=None, help="Seed for init, batches and the sample.")
@click.option("--iters", "max_iters", type=int, default=None, help="Optimiser steps.")
@click.option("--batch-size", type=int, default=None, help="Sequences per step.")
@click.option("--block-size", type=int, default=None, help="Context length in tokens.")
@click.option("--n-layer", type=int, default=None, help="Number of transformer blocks.")
@click.option("--n-head", type=int, default=None, help="Attention heads per block.")
@click.option("--n-embd", type=int, default=None, help="Embedding width (multiple of n-head).")
@click.option("--dropout", type=float, default=None, help="Dropout probability in [0, 1).")
@click.option("--lr", "learning_rate", type=float, default=None,
              help="Peak learning rate (warmup, then the --schedule's decay).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=None,
              help="Learning-rate decay after warmup: cosine (the default) or wsd (held at "
                   "the peak, then linear over the last 40% of the run; the speedrun preset's). "
                   "Both end at the preset's floor (10% of the peak; the speedrun's, 0).")
@click.option("--eval-interval", type=int, default=None,
              help="Steps between train/val loss estimates.")
@click.option("--sample-tokens", type=int, default=None,
              help="Characters to generate after training (0: no sample).")
@click.option("--out-dir", default="out", show_default=True, type=click.Path(file_okay=False),
              help="Run folder: ckpt.pt (latest, resumable), best.pt (lowest val loss), "
                   "metrics.jsonl.")
@click.option("--resume", "resume_dir", default=None, type=click.Path(file_okay=False),
              help="Continue the run saved in this folder bit-exactly (model, optimizer, "
                   "schedule, RNG, data position); settings come from its checkpoint, except "
                   "--lr, which may change (e.g. lower, after a divergence).")
@click.option("--grad-accum", type=int, default=None,
              help="Micro-batches of --batch-size per optimiser step (gradient accumulation).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Precision of the forward passes (torch.autocast); weights, gradients and "
                   "optimizer state stay float32. float16 (with a GradScaler) is for GPUs.")
@click.option("--compile/--no-compile", "compile", default=None,
              help="torch.compile the model (the first steps compile it).")
@click.option("--time-budget", type=float, default=None, metavar="SECONDS",
              help="Train for this many seconds of optimiser steps (evaluations not counted); "
                   "the learning-rate schedule follows the time used, so a slower machine takes "
                   "fewer steps and still finishes on time. --iters is then a cap.")
@click.option("--optimizer", default=None, metavar="NAME",
              help="adamw (default) or muon (Muon for hidden matrices, AdamW for the rest), or "
                   "a plugin's.")
@click.option("--muon-lr", type=float, default=None,
              help="Muon's peak learning rate (with --optimizer muon; default 0.02).")
@click.option("--overwrite", is_flag=True,
              help="Replace the run already in --out-dir (its ckpt.pt, best.pt and "
                   "metrics.jsonl are deleted). Without it such a folder is refused.")
@click.pass_context
def run(ctx, preset, data, out_dir, resume_dir, overwrite, **opts):
    """Train a model on War and Peace (or --data), evaluate it, save it and print a sample.

    Ctrl-C or SIGTERM saves a checkpoint first (after the current step, or at once during an
    evaluation); continue with --resume. A run folder that already holds a run is refused
    unless --resume or --overwrite. Under torchrun (`torchrun --nproc-per-node=N -m gptlab run
    ...`) the N processes train one model with DistributedDataParallel; rank 0 writes and
    prints.
    """
    from gptlab.core import distributed
    from gptlab.core.errors import GptlabError

    try:
        _run(ctx, preset, data, out_dir, resume_dir, overwrite, opts)
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


def _run(ctx, preset, data, out_dir, resume_dir, overwrite, opts):
    from click.core import ParameterSource

    from gptlab.core import distributed
    from gptlab.core.planning import plan_run
    from gptlab.core.devices import device_type
    from gptlab.core.checkpoint import load_checkpoint
    from gptlab.core.config import TrainConfig, resolve_configs
    from gptlab.core.generation import sample_text
    from gptlab.core.runs import RunFolder
    from gptlab.core.trainer import Trainer
    from gptlab.data.corpora import load_text, resolve_corpus

    main = distributed.is_main_process()  # under torchrun: the group is joined further down

    def say(*args, **kwargs):  # only rank 0 prints
        if main:
            click.echo(*args, **kwargs)

    reg = _registry(ctx)
    resume = None
    if resume_dir is not None:
        given = [p.opts[0] for p in ctx.command.params
                 if p.name not in ("resume_dir", "data", "out_dir", "learning_rate", "overwrite")
                 and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"--resume takes every setting but --lr from the checkpoint; "
                                   f"drop {', '.join(given)}")
        resume = load_checkpoint(resume_dir)
        model_cfg, train_cfg = resume.model_config, resume.train_config
        state = resume.train_state
        data = data or (state.data_source if state else None)
        if ctx.get_parameter_source("out_dir") != ParameterSource.COMMANDLINE:
            out_dir = resume_dir
        step = state.step if state else None
        lr = opts["learning_rate"]
        note = ""
        if lr is not None:
            note = f" with --lr {lr:g} (was {train_cfg.learning_rate:g})"
            train_cfg = TrainConfig(**{**train_cfg.to_dict(), "learning_rate": lr})
        say(f"resuming {resume_dir} at step {step}/{train_cfg.max_iters}{note}", err=True)
    else:
        model_keys = {"model", "block_size", "n_layer", "n_head", "n_embd", "dropout", "block",
                      "attention", "kernels", "norm", "mlp", "position", "qk_norm",
                      "untied_head", "zero_init"}
        model_over = {k: v for k, v in opts.items() if k in model_keys}
        train_over = {k: v for k, v in opts.items() if k not in model_keys}
        model_cfg, train_cfg = resolve_configs(preset, model_over, train_over)
    world = distributed.init(device_type(train_cfg.device))
    # the one pre-flight: names, device, attention, the run folder (before touching the data)
    plan = plan_run(reg, model_cfg, train_cfg,
                    prefer_attention=resume.metrics.get("attention") if resume else None,
                    prefer_kernels=resume.metrics.get("kernels", "torch") if resume else None,
                    new_run=resume is None)
    folder = None
    if world.is_main:
        same = resume_dir is not None and Path(resume_dir).resolve() == Path(out_dir).resolve()
        folder = RunFolder(out_dir, resume=same, overwrite=overwrite)

    progress, close = _download_progress() if world.is_main else (None, lambda: None)
    try:
        path = resolve_corpus(data, progress=progress)
        text = load_text(path)
    except BaseException:
        if folder is not None:
            folder.close()
        raise
    finally:
        close()
    say(f"data: {path} ({len(text):,} chars)", err=True)
    on_event, close = (_progress_printer(train_cfg.max_iters, train_cfg.time_budget)
                       if world.is_main else (None, lambda: None))
    try:
        trainer = Trainer(reg, model_cfg, train_cfg, text, out_dir=folder, on_event=on_event,
                          resume=resume, data_source=str(path), plan=plan)
        for note in trainer.notes:
            say(f"note: {note}", err=True)
        tc, T = trainer.cfg, model_cfg.block_size
        say(f"batch: {tc.batch_size} sequences x {tc.grad_accum} micro-batches x {world.size} "
            f"process{'es' if world.size > 1 else ''} = {tc.batch_size * trainer.micro_batches} "
            f"sequences of {T} tokens per step ({tc.dtype}{', compiled' if tc.compile else ''})",
            err=True)
        result = trainer.fit()
    finally:
        close()
    if not world.is_main:
        return
    mc = result.model_config
    attn = f", attention {result.attention}" if result.attention else ""
    click.echo(f"model: {mc.model} ({result.model.num_parameters() / 1e6:.2f}M parameters"
               f"{attn}), vocab {mc.vocab_size}")
    click.echo(f"train loss {result.train_loss:.4f} | val loss {result.val_loss:.4f} | "
               f"{_fmt_time(result.elapsed)} | {result.tokens_per_s:,.0f} tok/s")
    click.echo(f"checkpoint: {result.checkpoint}")
    if train_cfg.sample_tokens:
        text = sample_text(result.model, result.tokenizer, "", train_cfg.sample_tokens,
                           seed=train_cfg.seed)
        click.echo("--- sample ---")
        click.echo(text)


# --------------------------------------------------------------------------- sample / eval
@click.command()
@click.argument("checkpoint", default="out", type=click.Path())
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
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--attention", default=None, help="Override the checkpoint's attention backend.")
@click.option("--kernels", default=None, metavar="NAME",
              help="Override the checkpoint's layer kernels (native, torch, auto).")
@click.pass_context
def sample(ctx, checkpoint, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop,
           cache, stream, device, attention, kernels):
    """Generate text from a CHECKPOINT (a run folder or a .pt file; default: out)."""
    from gptlab.core.checkpoint import load_model
    from gptlab.core.devices import resolve_device
    from gptlab.core.generation import check_sampling, sample_text

    reg = _registry(ctx)
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
@click.argument("checkpoint", default="out", type=click.Path())
@click.option("--data", default=None, metavar="PATH|NAME",
              help="Text to evaluate on (default: the one the checkpoint was trained on).")
@click.option("--split", type=click.Choice(["val", "train"]), default="val", show_default=True,
              help="Which split of the text to evaluate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Windows of block_size tokens per forward pass.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--kernels", default=None, metavar="NAME",
              help="Override the checkpoint's layer kernels (native, torch, auto).")
@click.pass_context
def eval_cmd(ctx, checkpoint, data, split, batch_size, device, kernels):
    """Loss, perplexity and bits per character over the WHOLE split (deterministic)."""
    import math

    from gptlab.core.checkpoint import load_model
    from gptlab.core.devices import resolve_device
    from gptlab.core.evaluation import evaluate_split
    from gptlab.data.batches import encode_splits
    from gptlab.data.corpora import load_text, resolve_corpus

    reg = _registry(ctx)
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
@click.pass_context
def plugins(ctx):
    """List installed plugins and what each registers."""
    reg = _registry(ctx)
    for info in reg.plugins:
        click.echo(f"{info.name}  ({info.source})")
        if not info.registered:
            click.echo("    (registers nothing)")
        for kind, names in info.registered.items():
            click.echo(f"    {kind}: {', '.join(names)}")
    for problem in reg.problems:
        click.echo(f"WARNING: {problem}")


@click.command()
@click.option("--device", default="cpu", show_default=True, help="Device type to check for.")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "float64", "float16", "bfloat16"]))
@click.option("--head-dim", type=click.IntRange(min=1), default=32, show_default=True,
              help="Head dimension of the request.")
@click.option("--seq-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="Query and key length of the request.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              show_default=True, help="Attention dropout probability of the request.")
@click.option("--inference", is_flag=True, help="Forward only (no backward needed).")
@click.pass_context
def backends(ctx, device, dtype, head_dim, seq_len, dropout, inference):
    """List attention backends and layer kernels, best first, with why each can or cannot
    run."""
    import torch

    from gptlab.core.attention import AttentionRequest
    from gptlab.core.layer_kernels import KernelRequest
    from gptlab.core.devices import device_type, device_unavailable_reason
    from gptlab.core.selection import candidates

    reg = _registry(ctx)
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
        click.echo("(auto here: the highest priority; `gpt run` times the available ones on "
                   "its shape and takes the fastest, see GPTLAB_AUTO in the README)")
    kernel_request = KernelRequest(device=dev, dtype=getattr(torch, dtype))
    click.echo(f"layer kernels (--kernels; {kernel_request.describe()}):")
    _show_table(candidates(reg, "layer_kernels", kernel_request), kernel_request)


def _show_table(rows, request) -> None:
    """One line per backend (priority for the request, available, which auto takes), then its
    reasons."""
    from gptlab.core.selection import priority_of

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

    from gptlab import bench as benchmod
    from gptlab.core.attention import AttentionRequest
    from gptlab.core.devices import resolve_device
    from gptlab.core.selection import candidates

    reg = _registry(ctx)
    dev = resolve_device(device)
    skipped = []
    if names:
        chosen = [n.strip() for n in names.split(",") if n.strip()]
        for n in chosen:
            reg.attention_backend(n)
    else:
        req = AttentionRequest(device=dev.type, dtype=getattr(torch, dtype), head_dim=D)
        table = candidates(reg, "attention_backends", req)
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

    from gptlab import bench_train as bt
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
