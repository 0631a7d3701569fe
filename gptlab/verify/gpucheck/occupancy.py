"""Occupancy from ptxas' report: what one SM offers per compute capability, the occupancy
calculator's arithmetic, and the threads per block each kernel was compiled for (the PTX's
``.maxntid``, read with ``cuobjdump``)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import attrs

from gptlab.core.errors import first_line
from gptlab.plugins.cuda_kernels import build


@attrs.frozen
class SmLimits:
    """What one streaming multiprocessor offers the blocks resident on it."""

    arch: str  # e.g. "sm_90"
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 233472  # bytes blocks may use (228 KiB on sm_90)
    smem_reserved_per_block: int = 1024  # the system's share of every block (sm_80 and later)
    reg_alloc_unit: int = 256  # registers are given to a warp in units of this many
    partitions: int = 4  # register file quarters; a warp's registers come from one


#: Per compute capability (CUDA C Programming Guide, table of technical specifications).
KNOWN_LIMITS = {
    (8, 0): SmLimits("sm_80", smem_per_sm=167936),
    (8, 6): SmLimits("sm_86", max_threads_per_sm=1536, max_blocks_per_sm=16, smem_per_sm=102400),
    (8, 9): SmLimits("sm_89", max_threads_per_sm=1536, max_blocks_per_sm=24, smem_per_sm=102400),
    (9, 0): SmLimits("sm_90"),
}


def limits_for(major: int, minor: int, props=None) -> SmLimits:
    """The limits of compute capability ``major.minor``, with the numbers torch's device
    properties give (``props``) taking precedence over the table."""
    base = KNOWN_LIMITS.get((major, minor), SmLimits(f"sm_{major}{minor}"))
    base = attrs.evolve(base, arch=f"sm_{major}{minor}")
    if props is None:
        return base
    return attrs.evolve(
        base,
        regs_per_sm=int(getattr(props, "regs_per_multiprocessor", 0) or base.regs_per_sm),
        max_threads_per_sm=int(getattr(props, "max_threads_per_multi_processor", 0)
                               or base.max_threads_per_sm),
        smem_per_sm=int(getattr(props, "shared_memory_per_multiprocessor", 0)
                        or base.smem_per_sm))


@attrs.frozen
class Occupancy:
    """How many blocks of one kernel fit on an SM at once, and what stops more."""

    blocks_per_sm: int
    warps_per_sm: int
    fraction: float  # resident warps / the SM's maximum
    limiter: str  # threads, registers, shared memory or blocks

    def __str__(self):
        return f"{self.fraction:.0%} ({self.blocks_per_sm} blocks, {self.limiter})"


def occupancy(registers: int, threads: int, smem: int, limits: SmLimits) -> Occupancy:
    """Blocks of ``threads`` threads using ``registers`` per thread and ``smem`` bytes of shared
    memory that fit on one SM at once, and the share of its warps they fill (the CUDA occupancy
    calculator's arithmetic: registers per warp rounded up to the allocation unit and taken from
    one quarter of the register file; shared memory per block plus the system's reserve)."""
    warp = 32
    max_warps = limits.max_threads_per_sm // warp
    warps_per_block = max(1, math.ceil(threads / warp))
    caps = {"threads": max_warps // warps_per_block, "blocks": limits.max_blocks_per_sm}
    if registers > 0:
        per_warp = math.ceil(registers * warp / limits.reg_alloc_unit) * limits.reg_alloc_unit
        warps = (limits.regs_per_sm // limits.partitions // per_warp) * limits.partitions
        caps["registers"] = warps // warps_per_block
    per_block = math.ceil((smem + limits.smem_reserved_per_block) / 128) * 128
    caps["shared memory"] = limits.smem_per_sm // per_block
    limiter = min(caps, key=lambda k: caps[k])
    blocks = max(0, caps[limiter])
    return Occupancy(blocks, blocks * warps_per_block, blocks * warps_per_block / max_warps,
                     limiter)


_PTX_ENTRY = re.compile(r"\.entry\s+([\w$.]+)\s*\((.*?)\)\s*([^{]*)\{", re.S)
_MAXNTID = re.compile(r"\.maxntid\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?")


def parse_launch_bounds(ptx: str) -> dict[str, int]:
    """Mangled kernel name -> the most threads per block it was compiled for (``.maxntid``, from
    ``__launch_bounds__``), for the kernels of a PTX listing that declare one."""
    out = {}
    for m in _PTX_ENTRY.finditer(ptx):
        if n := _MAXNTID.search(m.group(3)):
            out[m.group(1)] = math.prod(int(g or 1) for g in n.groups())
    return out


def launch_bounds(library: Path) -> tuple[dict[str, int], str | None]:
    """(readable kernel name -> threads per block, why none if they cannot be read): from the
    library's PTX by ``cuobjdump -ptx`` (the fatbinary is compressed: only cuobjdump reads it)."""
    tool = shutil.which("cuobjdump")
    nvcc = build.find_compiler(build.CUDA)
    for folder in ([Path(nvcc).resolve().parent] if nvcc else []) + [Path("/usr/local/cuda/bin")]:
        if tool is None and (folder / "cuobjdump").is_file():
            tool = str(folder / "cuobjdump")
    if tool is None:
        return {}, "cuobjdump not found: threads per block unknown"
    try:
        proc = subprocess.run([tool, "-ptx", str(library)], capture_output=True, text=True,
                              timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        return {}, f"cuobjdump failed: {first_line(e, 100)}"
    bounds = parse_launch_bounds(proc.stdout)
    if not bounds:
        return {}, f"cuobjdump -ptx gave no .maxntid (exit {proc.returncode})"
    names = build._demangle(sorted(bounds))
    return {names[k]: v for k, v in bounds.items()}, None
