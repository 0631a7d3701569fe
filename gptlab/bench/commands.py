"""The ``gpt bench`` group: attention, train, generate and ops, each printing its table."""

from __future__ import annotations

import attrs
import click

from gptlab import options
from gptlab.console import Table
from gptlab.core.config import DTYPES
from gptlab.core.errors import GptlabError, printable


@click.group()
def bench():
    """Benchmarks (ratios against a baseline measured in the same run)."""


def _where(dev) -> str:
    """The GPU's name, or the CPU threads torch uses."""
    import torch

    n = torch.get_num_threads()
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"{n} thread{'s' * (n != 1)}"


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
@options.device_option(help="cpu, or cuda / cuda:N (times bracketed by synchronize, memory "
                            "from torch.cuda.max_memory_allocated).")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="dtype of q, k, v (the tensor-core backends take bfloat16 and float16).")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Also draw time and peak memory against T, one line per backend, into this "
                   "image (its suffix names the format: .png, .pdf, .svg; needs matplotlib: "
                   "pip install 'gptlab[plot]').")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the table as markdown, headed by the command and the machine, "
                   "to this file.")
@options.pass_registry
def bench_attention(reg, names, seq_lens, B, H, D, reps, device, dtype, plot_path, out_path):
    """Causal forward+backward time and peak extra memory per backend and T, vs sdpa."""
    import torch

    from gptlab.bench import attention
    from gptlab.core.attention import AttentionRequest
    from gptlab.core.devices import resolve_device
    from gptlab.core.selection import candidates
    from gptlab.core.sizing import check_attention_points

    if plot_path:  # before measuring: a missing extra is one line, not a lost run
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise GptlabError("--plot needs matplotlib: pip install 'gptlab[plot]'") from None
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
    check_attention_points([reg.attention_backend(n) for n in chosen], lens, B=B, H=H, D=D,
                           dtype=getattr(torch, dtype), device=dev)
    click.echo(f"causal attention forward+backward, B={B} H={H} D={D}, {dtype}, {dev}, "
               f"{_where(dev)}")
    for name, reasons in skipped:
        click.echo(printable(f"{name}: not run: {'; '.join(reasons)}", keep=""))
    table = Table([("backend", "<10"), ("T", ">6"), ("time ms", ">11.2f"), ("x sdpa", ">8"),
                   ("peak MiB", ">11"), ("x sdpa", ">8")])
    click.echo(table.header())
    pending, rows = [], []

    def show(point):  # a row of T, once every backend has run at it
        pending.append(point)
        if point.backend != chosen[-1]:
            return
        base = next((p for p in pending if p.backend == "sdpa"), None)
        for p in pending:
            if p.error:
                click.echo(printable(f"{table.row(p.backend, p.T)}  error: {p.error}", keep=""))
                continue
            rt = f"{p.time_ms / base.time_ms:.2f}" if base and base.time_ms else "-"
            mem = f"{p.peak_extra_mib:.1f}" if p.peak_extra_mib is not None else "n/a"
            rm = (f"{p.peak_extra_mib / base.peak_extra_mib:.2f}"
                  if base and base.peak_extra_mib and p.peak_extra_mib is not None else "-")
            click.echo(table.row(p.backend, p.T, p.time_ms, rt, mem, rm))
            rows.append(f"| {p.backend} | {p.T} | {p.time_ms:.2f} | {rt} | {mem} | {rm} |")
        pending.clear()

    points = attention.run(chosen, lens, B=B, H=H, D=D, reps=reps, device=str(dev),
                           dtype=dtype, on_point=show)
    title = (f"causal attention forward+backward, B={B} H={H} D={D}, {dtype}, {dev}, "
             f"{_where(dev)}")
    if out_path:
        import torch

        from gptlab.core.files import atomic_write

        command = options.command_line(click.get_current_context())
        atomic_write(out_path, f"`{command}`: {title}; torch {torch.__version__}.\n\n"
                               "| backend | T | time ms | x sdpa | peak MiB | x sdpa |\n"
                               "|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n")
        click.echo(f"wrote {out_path}")
    if plot_path:
        from gptlab.plot import plot_attention_bench

        plot_attention_bench([attrs.asdict(p) for p in points if not p.error], plot_path,
                             title=title)
        click.echo(f"wrote {plot_path}")


@bench.command("train")
@click.option("--preset", default="default", show_default=True, help="The model and batch.")
@click.option("--variants", default="float32,float32+compile,bfloat16,bfloat16+compile",
              show_default=True,
              help="Comma-separated DTYPE[+compile][@BACKEND][/KERNELS][:MATMUL][~FEATURE], "
                   "or peer[+compile] (needs --peer); the first is the baseline. DTYPE auto is "
                   "gpt run's default; :MATMUL names the Linear layers' products (onednn, "
                   "torch); ~fused-adamw, ~packed-grads or ~keep-freed-memory turns that "
                   "feature off. "
                   "Each variant runs in a process of its own.")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Optimiser steps per variant per round.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Interleaved rounds (the median is reported, and the median of the rounds' "
                   "ratios).")
@click.option("--warmup", type=click.IntRange(min=1), default=3, show_default=True,
              help="Untimed steps first (they include compilation).")
@options.data_option("Text to train on (default: War and Peace).")
@options.device_option(None, "cpu, cuda, cuda:N or auto (default: the preset's, cpu).")
@click.option("--peer", default=None, metavar="PATH", type=click.Path(dir_okay=False),
              help="nanoGPT's model.py (not shipped): adds a 'peer' variant, the same model "
                   "written by nanoGPT, and a column of ratios to it.")
@options.pass_registry
def bench_train(reg, preset, variants, steps, rounds, warmup, data, device, peer):
    """Training tokens/s of whole optimiser steps, per variant, as ratios to the first variant
    measured in the same run (interleaved rounds, same batches; a ratio is the median of the
    rounds' ratios, so a machine that drifts between rounds moves both sides alike)."""
    import torch

    from gptlab.bench import train
    from gptlab.data.corpora import load_text, resolve_corpus

    chosen = [train.Variant.parse(v.strip()) for v in variants.split(",") if v.strip()]
    if peer and not any(v.peer for v in chosen):
        chosen.append(train.Variant.parse("peer"))
    for v in chosen:  # unknown names: one line, before any process starts
        if v.attention and v.attention != "auto":
            reg.get("attention_backends", v.attention)
        if v.kernels and v.kernels != "auto":
            reg.get("layer_kernels", v.kernels)
        if v.matmul and v.matmul != "auto":
            reg.get("matmuls", v.matmul)
    path = resolve_corpus(data)
    load_text(path)  # likewise a text that cannot be used
    click.echo(f"training steps of --preset {preset}, {torch.get_num_threads()} threads, torch "
               f"{torch.__version__}; {rounds} rounds x {steps} steps, median", err=True)
    results = train.run(str(path), chosen, preset=preset, steps=steps, rounds=rounds,
                        warmup=warmup, device=device, peer=peer,
                        on_progress=lambda m: click.echo(f"  {m}", err=True))
    base = results[0]
    peer = next((r for r in results if r.variant.name == "peer"), None)
    width = max(28, *(len(r.variant.name) + 1 for r in results))
    table = Table([("variant", f"<{width}"), ("dtype", "<10"), ("attention", "<11"), ("kernels", "<9"),
                   ("matmul", "<8"), ("tokens/s", ">10,.0f"), ("x base", ">8.2f"),
                   *([("x peer", ">8.2f")] if peer else [])])
    click.echo(table.header())
    for r in results:
        click.echo(table.row(r.variant.name, r.dtype, r.attention or "-", r.kernels or "-",
                             r.matmul or "-", r.median, r.ratio_to(base),
                             *([r.ratio_to(peer)] if peer else [])))


@bench.command("generate")
@options.checkpoint_argument
@click.option("--tokens", type=click.IntRange(min=1), default=500, show_default=True,
              help="Tokens to generate, with and without the cache.")
@click.option("--prompt", default="", help="Prompt (default: start from token 0).")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Interleaved rounds (without, then with the cache); medians are reported, "
                   "and the median of the rounds' speed-ups.")
@options.pass_registry
def bench_generate(reg, checkpoint, tokens, prompt, rounds):
    """Greedy generation speed with and without the KV cache, and whether outputs match."""
    import torch

    from gptlab.bench import generate
    from gptlab.core.checkpoint import load_model

    model, tokenizer, _ = load_model(reg, checkpoint)
    idx = torch.tensor([tokenizer.encode(prompt) if prompt else [0]], dtype=torch.long)
    result = generate.run(model, idx, tokens, rounds, on_round=lambda r, off, on: click.echo(
        f"  round {r + 1}/{rounds}: {off:,.1f} and {on:,.1f} tok/s", err=True))
    off, on = result.median_without, result.median_with
    click.echo(f"without cache: {off:,.1f} tok/s")
    click.echo(f"with cache:    {on:,.1f} tok/s  ({result.speedup:.1f}x: the median of the "
               f"rounds' ratios; speeds: medians of {rounds} interleaved rounds)")
    click.echo(f"greedy outputs identical: {'yes' if result.identical else 'NO'} ({tokens} "
               f"tokens)")


@bench.command("ops")
@click.option("--ops", "op_names", default=None, metavar="NAMES",
              help="Comma-separated: layer_norm, linear_gelu, cross_entropy (default: all).")
@click.option("--batch", "B", type=click.IntRange(min=1), default=32, show_default=True,
              help="Batch size B (rows = B * T).")
@click.option("--block", "T", type=click.IntRange(min=1), default=128, show_default=True,
              help="Block size T.")
@click.option("--n-embd", "C", type=click.IntRange(min=1), default=192, show_default=True,
              help="Width C of the LayerNorm; linear + GELU maps C to 4 * C.")
@click.option("--vocab", "V", type=click.IntRange(min=1), default=111, show_default=True,
              help="Vocabulary V of the cross-entropy.")
@click.option("--rounds", type=click.IntRange(min=1), default=30, show_default=True,
              help="Interleaved rounds (each times every implementation once); the median is "
                   "shown.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch.set_num_threads for the run (both torch and the C kernels follow it).")
@options.device_option(help="cpu, or cuda / cuda:N (the nvcc kernels; times bracketed by "
                            "synchronize).")
@click.option("--clock", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
              help="cpu: the process's CPU time (all threads) instead of wall time, for a "
                   "machine shared with other work.")
@options.pass_registry
def bench_ops(reg, op_names, B, T, C, V, rounds, threads, device, clock):
    """Forward+backward time of the layer kernels' operations vs the PyTorch code they replace.

    Each registered layer kernels (--kernels NAME) that runs here, against F.layer_norm,
    F.gelu(linear(x)) (and the product alone) and F.cross_entropy, at the default model's sizes
    (rows = 32 x 128, C = 192, 4C = 768, V = 111). The ratio column is each time over the
    reference's time in the same run (below 1: faster than it).
    """
    import torch

    from gptlab.bench import ops
    from gptlab.core.devices import resolve_device

    names = [n.strip() for n in op_names.split(",") if n.strip()] if op_names else ops.OPS
    unknown = [n for n in names if n not in ops.OPS]
    if unknown or not names:
        raise click.BadParameter(f"unknown op(s) {', '.join(unknown) or '(none)'}; known: "
                                 f"{', '.join(ops.OPS)}", param_hint="--ops")
    dev = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    kernels, skipped = ops.layer_kernels(reg, str(dev))
    click.echo(f"forward+backward, float32, {dev} ({_where(dev)}); rows = {B} x {T} = {B * T}, "
               f"C = {C}, 4C = {4 * C}, V = {V}; median {clock} time of {rounds} interleaved "
               f"rounds")
    for name, reasons in skipped:
        click.echo(printable(f"--kernels {name}: not run: {'; '.join(reasons)}", keep=""))
    table = Table([("op", "<15"), ("implementation", "<20"), ("time ms", ">9.3f"),
                   ("x ref", ">7.2f")])
    click.echo(table.header())
    timings = ops.run(kernels, names, B=B, T=T, C=C, V=V, rounds=rounds, device=str(dev),
                      clock=clock)
    for op in names:
        rows = [t for t in timings if t.op == op]
        base = next(t for t in rows if t.baseline)
        for t in rows:
            click.echo(table.row(t.op, t.impl, t.time_ms, t.time_ms / base.time_ms))
