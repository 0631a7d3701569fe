"""The ``gpt kernels`` command group: build, inspect and verify the native kernel libraries.

``build`` and ``info`` are the runtime's and defined here; ``check``, ``mutations`` and
``gpucheck`` are the verification tools' (:mod:`gptlab.verify.commands`), added to the group at
the end of this module. Imported by the plugin's ``register_commands`` hook only when the CLI is
built, never by a plugin load.
"""

import time

import click


@click.group("kernels")
def kernels():
    """Build, inspect and verify the native kernel libraries."""


def _resources_summary(report) -> str:
    if not report:
        return "no ptxas report"
    archs = sorted({r.arch for r in report})
    spilled = sum(r.spill_stores + r.spill_loads for r in report)
    return (f"{len({r.kernel for r in report})} kernels x {len(archs)} archs "
            f"({', '.join(archs)}): max {max(r.registers for r in report)} registers, "
            f"{spilled} bytes spilled")


@kernels.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if a cached library exists.")
@click.option("--flavour", "names", multiple=True, metavar="NAME",
              help="Build only this flavour (cpu, cuda, cuda-emu, cuda-emu-racecheck); "
                   "repeatable. Default: all.")
def build_cmd(force, names):
    """Compile the kernel libraries now (otherwise each is built on first use).

    cpu: the C kernels (by $CC). cuda: the .cu kernels by nvcc ($NVCC) for sm_80 and sm_90.
    cuda-emu: the same .cu kernels by $CXX against the CUDA emulator, to run on the CPU;
    cuda-emu-racecheck: the same with the emulator's race detector. Without --flavour, a flavour
    whose compiler is missing is skipped with the reason; a flavour named with --flavour that
    cannot be built is an error. A cached library that fails verification (truncated, replaced,
    or built by an older gptlab) is rebuilt, and said so.
    """
    from gptlab.core.errors import GptlabError
    from gptlab.plugins.cuda_kernels import build, loader
    from gptlab.plugins.cuda_kernels.abi import ABI_VERSION

    flavours = [build.get_flavour(name) for name in names or build.FLAVOURS]
    if names:  # asked for by name: a missing compiler is an error, before building any
        for flavour in flavours:
            if missing := build.missing_compiler_reason(flavour):
                raise build.KernelBuildError(f"cannot build --flavour {flavour.name}: {missing}")
    failed = []
    for flavour in flavours:
        name = flavour.name
        missing = build.missing_compiler_reason(flavour)
        if missing:
            click.echo(f"{name}: skipped: {missing}")
            continue
        start = time.perf_counter()
        try:
            path, damage = build.build_library(flavour, force=force)
            lib = loader.NativeLibrary(path)
        except GptlabError as e:
            click.echo(f"{name}: FAILED: {e}")
            failed.append(name)
            continue
        if damage:
            click.echo(f"{name}: rebuilt: the cached library failed verification: {damage}")
        click.echo(f"{name}: {path} (ABI {ABI_VERSION}, flavour {lib.flavour}, "
                   f"{time.perf_counter() - start:.1f}s)")
        if flavour is build.CUDA:
            click.echo(f"    ptxas: {_resources_summary(build.resource_report(path))}")
            count, why = lib.cuda_device_count()
            click.echo(f"    GPUs: {count}" + (f" ({why})" if why else ""))
    if failed:
        raise click.ClickException(f"could not build: {', '.join(failed)}")


@kernels.command("info")
def info_cmd():
    """Show the cache, the compilers found, and nvcc's per-kernel registers and spills."""
    from gptlab.plugins.cuda_kernels import build

    click.echo(f"cache: {build.cache_root()}")
    for name, flavour in build.FLAVOURS.items():
        cc = build.find_compiler(flavour)
        click.echo(f"{name}: compiler {flavour.compiler()!r} -> {cc or 'not found'}")
    if build.find_compiler(build.CUDA):
        report = build.resource_report(build.build(build.CUDA))
        click.echo(f"cuda kernels ({_resources_summary(report)}):")
        w = max([len("kernel"), *(len(r.kernel) for r in report)]) + 2
        click.echo(f"    {'kernel':<{w}}{'arch':<7}{'regs':>5}{'spill st/ld':>13}{'smem':>6}")
        for r in sorted(report, key=lambda r: (r.kernel, r.arch)):
            click.echo(f"    {r.kernel:<{w}}{r.arch:<7}{r.registers:>5}"
                       f"{f'{r.spill_stores}/{r.spill_loads}':>13}{r.static_smem:>6}")


def _add_verify_commands() -> None:
    """``gpt kernels check / mutations / gpucheck``: the verification tools (:mod:`gptlab.verify`),
    offered in this group beside build and info (called at the end of this module)."""
    from gptlab.verify.commands import COMMANDS

    for command in COMMANDS:
        kernels.add_command(command)


@kernels.command("bench-ops")
@click.option("--ops", "op_names", default=None, metavar="NAMES",
              help="Comma-separated: layer_norm, cross_entropy, bias_gelu (default: all).")
@click.option("--batch", "B", type=click.IntRange(min=1), default=32, show_default=True,
              help="Batch size B (rows = B * T).")
@click.option("--block", "T", type=click.IntRange(min=1), default=128, show_default=True,
              help="Block size T.")
@click.option("--n-embd", "C", type=click.IntRange(min=1), default=192, show_default=True,
              help="Width C of the LayerNorm; bias + GELU runs on 4 * C.")
@click.option("--vocab", "V", type=click.IntRange(min=1), default=111, show_default=True,
              help="Vocabulary V of the cross-entropy.")
@click.option("--rounds", type=click.IntRange(min=1), default=30, show_default=True,
              help="Interleaved rounds (each times every implementation once); the median is "
                   "shown.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch.set_num_threads for the run (both torch and the C kernels follow it).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, or cuda / cuda:N (the nvcc kernels; times bracketed by synchronize).")
@click.option("--clock", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
              help="cpu: the process's CPU time (all threads) instead of wall time, for a "
                   "machine shared with other work.")
def bench_ops_cmd(op_names, B, T, C, V, rounds, threads, device, clock):
    """Forward+backward time of the row-wise kernels vs the PyTorch code they replace.

    gptlab::layer_norm vs F.layer_norm and gptlab.nn.LayerNorm (written out in torch ops),
    gptlab::cross_entropy vs F.cross_entropy, gptlab::bias_gelu vs F.gelu(x + b), at the default
    model's sizes (rows = 32 x 128, C = 192, 4C = 768, V = 111). The ratio column is each time
    over the PyTorch reference's time in the same run (below 1: faster than it).
    """
    import torch

    from gptlab import bench as benchmod
    from gptlab.core.devices import resolve_device

    names = [n.strip() for n in op_names.split(",") if n.strip()] if op_names else benchmod.OPS
    unknown = [n for n in names if n not in benchmod.OPS]
    if unknown or not names:
        raise click.BadParameter(f"unknown op(s) {', '.join(unknown) or '(none)'}; known: "
                                 f"{', '.join(benchmod.OPS)}", param_hint="--ops")
    dev = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    where = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    click.echo(f"forward+backward, float32, {dev} ({where}); rows = {B} x {T} = {B * T}, "
               f"C = {C}, 4C = {4 * C}, V = {V}; median {clock} time of {rounds} interleaved "
               f"rounds")
    click.echo(f"{'op':<15}{'implementation':<25}{'time ms':>9}{'x torch':>9}")
    timings = benchmod.run_ops(names, B=B, T=T, C=C, V=V, rounds=rounds, device=str(dev),
                               clock=clock)
    for op in names:
        rows = [t for t in timings if t.op == op]
        base = next(t for t in rows if t.baseline)
        for t in rows:
            click.echo(f"{t.op:<15}{t.impl:<25}{t.time_ms:>9.3f}{t.time_ms / base.time_ms:>9.2f}")


_add_verify_commands()
