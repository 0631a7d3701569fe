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


_add_verify_commands()
