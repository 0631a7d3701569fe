"""Native attention kernels (C for the CPU; CUDA in the next step), loaded with cffi.

Registers the ``fused`` (fused scale + mask + softmax) and ``flash`` (FlashAttention: Dao et al.
2022; Dao 2023) attention backends, and the ``gpt kernels`` command group. Layout:
``csrc/gptlab_kernels.h`` (the one C ABI, also the cffi cdef), ``csrc/cpu/`` (C kernels),
``build.py`` (cached, locked compilation), ``loader.py`` (cffi), ``ops.py`` (torch custom ops
with autograd), ``backends.py`` (the attention backends).
"""

import click

from gptlab import hookimpl


@hookimpl
def register_attention_backends():
    from gptlab.plugins.cuda_kernels import ops  # noqa: F401  (registers torch.ops.gptlab.*)
    from gptlab.plugins.cuda_kernels.backends import FlashAttention, FusedAttention

    return [FusedAttention, FlashAttention]


@click.group("kernels")
def kernels():
    """Build and inspect the native kernel libraries."""


@kernels.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if a cached library exists.")
def build_cmd(force):
    """Compile the kernel libraries now (otherwise they are built on first use)."""
    from gptlab.plugins.cuda_kernels import build, loader

    for name, flavour in build.FLAVOURS.items():
        path = build.build(flavour, force=force)
        lib = loader.NativeLibrary(path)
        click.echo(f"{name}: {path} (ABI {loader.ABI_VERSION}, flavour {lib.flavour})")


@kernels.command("info")
def info_cmd():
    """Show where libraries are cached and which compilers are found."""
    from gptlab.plugins.cuda_kernels import build

    click.echo(f"cache: {build.cache_root()}")
    for name, flavour in build.FLAVOURS.items():
        cc = build.find_compiler(flavour)
        click.echo(f"{name}: compiler {flavour.compiler()!r} -> {cc or 'not found'}")


@hookimpl
def register_commands(cli):
    cli.add_command(kernels)
