"""The environment section: GPU, driver, torch and nvcc, the architectures the ``cuda`` flavour
is built for here; the ``cuda`` build, and ptxas' registers / spills / shared memory per kernel
with the occupancy each implies on this GPU."""

from __future__ import annotations

import platform
import shutil
import subprocess
import time
from pathlib import Path

from gptlab.plugins.cuda_kernels import build, loader
from gptlab.verify.gpucheck.occupancy import (KNOWN_LIMITS, SmLimits, launch_bounds, limits_for,
                                              occupancy)
from gptlab.verify.gpucheck.options import Options
from gptlab.verify.gpucheck.report import Progress, Section, table
from gptlab.verify.gpucheck.targets import Target


def run(s: Section, t: Target, o: Options, progress: Progress) -> None:
    """The versions table, then each flavour built (emulated: cuda-emu too) with the cuda
    build's ptxas table; fails on a CUDA version mismatch, no GPU for the kernels, or a spill."""
    import torch

    nvcc = build.nvcc_cuda_version()
    driver = build.driver_cuda_version()
    rows = [["python", platform.python_version()],
            ["torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"],
            ["nvcc", f"{build.find_compiler(build.CUDA) or 'not found'}"
                     + (f" (CUDA {nvcc[0]}.{nvcc[1]})" if nvcc else "")],
            ["driver", _driver_version()
             + (f", supports CUDA {driver[0]}.{driver[1]}" if driver else "")]]
    if t.emulated:
        limits = KNOWN_LIMITS[(9, 0)]
        rows.append(["GPU", "none (emulated); occupancy below for an sm_90 SM (H100)"])
    else:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        limits = limits_for(props.major, props.minor, props)
        rows += [["GPU", f"{props.name}, {props.multi_processor_count} SMs, "
                         f"{props.total_memory / 2**30:.1f} GiB"],
                 ["compute capability", f"{props.major}.{props.minor}"]]
    plan = build.arch_plan(known=build.nvcc_archs())
    rows.append(["cuda build for", f"SASS {', '.join(f'sm_{a}' for a in plan.sass)}, PTX "
                 f"compute_{max(plan.sass)}"
                 + (f"; {', '.join(plan.jit)} will run the PTX" if plan.jit else "")])
    s.lines += table(["", ""], rows)
    s.add()
    if mismatch := build.cuda_version_mismatch():
        s.fail(f"- FAIL: {mismatch}")
    for flavour in ([build.CUDA_EMU] if t.emulated else []) + [build.CUDA]:
        if t.emulated and build.missing_compiler_reason(flavour):
            s.add(f"- {flavour.name}: not built: {build.missing_compiler_reason(flavour)}")
            continue
        start = time.perf_counter()
        progress(f"building the {flavour.name} kernels")
        path = build.build(flavour)
        lib = loader.NativeLibrary(path)
        s.add(f"- {flavour.name}: `{path}` ({time.perf_counter() - start:.1f} s)")
        if flavour is build.CUDA:
            count, why = lib.cuda_device_count()
            if not t.emulated and (why or count == 0):
                s.fail(f"- FAIL: the CUDA kernels find no usable GPU: {why or 'count 0'}")
            elif not t.emulated:
                s.add(f"- the CUDA kernels see {count} GPU(s)")
            _ptxas(s, path, limits)


def _ptxas(s: Section, path: Path, limits: SmLimits) -> None:
    """ptxas' table for the architecture this GPU runs, with threads and occupancy."""
    report = build.resource_report(path)
    if not report:
        s.fail("- FAIL: no ptxas report in build.log")
        return
    archs = sorted({r.arch for r in report})
    arch = limits.arch if limits.arch in archs else ("sm_80" if limits.arch.startswith("sm_8")
                                                      and "sm_80" in archs else None)
    rows_of = [r for r in report if arch is None or r.arch == arch]
    bounds, why = launch_bounds(path)
    s.add()
    s.add(f"ptxas ({', '.join(archs)}; rows for {arch or 'every arch'}, the code this GPU "
          f"runs). Occupancy on {limits.arch}: registers and static shared memory at the "
          f"kernel's launch bound; dynamic shared memory (sized at launch) not counted"
          + (f"; {why}" if why else "") + ":")
    s.add()
    rows = []
    for r in sorted(set(rows_of), key=lambda r: (r.kernel, r.arch)):  # a template's twins
        threads = bounds.get(r.kernel)
        occ = (str(occupancy(r.registers, threads, r.static_smem, limits)) if threads
               else "n/a")
        rows.append([f"`{r.kernel}`", r.arch, r.registers,
                     f"{r.spill_stores}/{r.spill_loads}", r.stack_frame, r.static_smem,
                     threads or "?", occ])
    s.lines += table(["kernel", "arch", "regs", "spill st/ld B", "stack B", "smem B",
                      "threads", "occupancy"], rows)
    spilled = [r for r in report if r.spill_stores or r.spill_loads]
    if spilled:
        s.fail(f"- FAIL: {len(spilled)} kernel(s) spill registers")


def _driver_version() -> str:
    """The driver's version from nvidia-smi, or what is known without it."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            proc = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30)
            if proc.returncode == 0 and proc.stdout.strip():
                return proc.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown (no nvidia-smi)"
