"""``gpt kernels gpucheck``: check the CUDA kernels on one GPU machine and write one markdown report.

Made for a borrowed GPU (minutes, not hours): one command, under 10 minutes on an H100, that
leaves everything worth knowing in one file. Four sections, each failing soft (an exception is
one line in its section and the next section runs):

- **environment**: GPU, compute capability, driver, torch and its CUDA, nvcc; builds the ``cuda``
  flavour and shows ptxas' registers / spills / shared memory per kernel with the occupancy each
  implies on this GPU (:func:`occupancy`; threads per block from the PTX's ``.maxntid``, read
  with ``cuobjdump`` where it is installed);
- **conformance**: every CUDA attention backend and CUDA layer kernel of this package (found in
  the registry, so a backend added later is checked without editing this file), per dtype it
  declares: float32 attention by :func:`gptlab.testing.run_conformance`, other dtypes by
  FlashAttention's precision rule (:func:`gptlab.testing.check_precision`) on a few shapes; the
  rule at a long causal sequence for every backend and dtype; the layer kernels by
  :func:`gptlab.testing.check_layer_kernels`;
- **sanitizer**: ``compute-sanitizer`` memcheck, racecheck and synccheck on a small-case run of
  every kernel (``python -m gptlab.plugins.cuda_kernels.gpucheck smoke``);
- **benchmark**: forward and forward+backward of each backend and dtype against sdpa in the same
  dtype: median of CUDA-event times after a warm-up (:func:`median_time`), TFLOP/s
  (:func:`attention_flops`) and peak memory (``torch.cuda.max_memory_allocated``).

The pure parts (FLOPs, occupancy, the PTX parser, the timing harness, the section runner, the
report) are plain functions tested on the CPU. ``--emulate`` runs the whole command on the CPU with
the emulated kernels (the ``.cu`` files run by the CUDA emulator, :class:`Target` ``emulated``):
a rehearsal of the command, not a measurement of a GPU.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import attrs

from gptlab.core.errors import DeviceError, first_line

#: The package whose registered CUDA backends and layer kernels are checked.
PACKAGE = "gptlab.plugins.cuda_kernels"
#: The package of their emulated twins (``--emulate``).
EMULATED_PACKAGE = "gptlab.verify"
SECTIONS = ("environment", "conformance", "sanitizer", "benchmark")
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
DEFAULT_RESULTS = Path("benchmarks") / "results"
#: ``--quick``: the conformance suite on these lengths and head dims only (35 cases, not 151).
QUICK_SEQ_LENS = (1, 7, 65)
QUICK_HEAD_DIMS = (16, 80)


# ------------------------------------------------------------------ FLOPs
def attention_flops(B: int, H: int, Tq: int, Tk: int, D: int, *, causal: bool,
                    backward: bool = False) -> float:
    """FLOPs of attention as FlashAttention-2 counts them: 4·B·H·Tq·Tk·D for the forward (two
    matrix products of 2·Tq·Tk·D each), halved when causal; forward+backward is 3.5 times the
    forward (the backward's five products: 2.5 times)."""
    flops = 4.0 * B * H * Tq * Tk * D
    if causal:
        flops /= 2
    return flops * 3.5 if backward else flops


# ------------------------------------------------------------------ occupancy
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
    from gptlab.plugins.cuda_kernels import build

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


# ------------------------------------------------------------------ timing
@attrs.frozen
class Timing:
    median_s: float
    samples: tuple[float, ...]


def median_time(step: Callable[[], object], *, timer: Callable[[Callable], float],
                reps: int = 10, warmup: int = 3) -> Timing:
    """Run ``step`` ``warmup`` times untimed, then ``reps`` times through ``timer`` (which runs
    the step it is given once and returns its seconds); the median of those."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got {reps}, {warmup}")
    for _ in range(warmup):
        step()
    samples = tuple(float(timer(step)) for _ in range(reps))
    return Timing(statistics.median(samples), samples)


def perf_counter_timer(step: Callable[[], object]) -> float:
    """Wall time of one call (for CPU tensors, whose kernels finish before they return)."""
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def cuda_event_timer(step: Callable[[], object]) -> float:
    """GPU time of one call between two CUDA events on the current stream."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def cuda_peak_mib(step: Callable[[], object]) -> float:
    """Rise of ``torch.cuda.max_memory_allocated`` over the memory allocated before ``step``."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ------------------------------------------------------------------ sections and the report
@attrs.define
class Section:
    title: str
    lines: list[str] = attrs.Factory(list)
    failed: bool = False
    seconds: float = 0.0

    def add(self, line: str = "") -> None:
        self.lines.append(line)

    def fail(self, line: str) -> None:
        self.failed = True
        self.lines.append(line)


def run_section(title: str, fn: Callable[[Section], object],
                progress: Callable[[str], object] = lambda _: None) -> Section:
    """Run one section; an exception becomes one ``**error**`` line and a failed section."""
    section = Section(title)
    progress(f"{title}: starting")
    start = time.perf_counter()
    try:
        fn(section)
    except Exception as e:  # soft: the next section runs (KeyboardInterrupt still stops)
        section.fail(f"**error** ({type(e).__name__}): {first_line(e, 300)}")
    section.seconds = time.perf_counter() - start
    progress(f"{title}: {'FAILED' if section.failed else 'ok'} ({section.seconds:.1f}s)")
    return section


@attrs.define
class Report:
    title: str
    header: list[str] = attrs.Factory(list)
    sections: list[Section] = attrs.Factory(list)

    @property
    def failed(self) -> list[str]:
        return [s.title for s in self.sections if s.failed]

    def markdown(self) -> str:
        out = [f"# {self.title}", "", *self.header, "", "| section | result | time |",
               "|---|---|---|"]
        out += [f"| {s.title} | {'FAIL' if s.failed else 'pass'} | {s.seconds:.1f} s |"
                for s in self.sections]
        for s in self.sections:
            out += ["", f"## {s.title}", "", *s.lines]
        return "\n".join(out).rstrip() + "\n"


def table(header: list[str], rows: list[list[object]]) -> list[str]:
    """A markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


# ------------------------------------------------------------------ what is checked
def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtypes(cls) -> list:
    import torch

    return sorted(cls.dtypes, key=lambda d: (d != torch.float32, _dtype_name(d)))


def _ours(cls, package: str = PACKAGE) -> bool:
    return cls.__module__ == package or cls.__module__.startswith(package + ".")


def _subclasses(base) -> list[type]:
    out, todo = [], [base]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in out:
                out.append(sub)
                todo.append(sub)
    return out


@attrs.frozen
class Target:
    """Where the checked kernels run: ``cuda`` (the nvcc library on the GPU) or, emulated, the
    ``.cu`` kernels on CPU tensors through the emulator. ``attention`` and ``layer_kernels`` are
    the classes checked; ``baseline`` is sdpa."""

    device: str
    emulated: bool
    attention: tuple[type, ...]
    layer_kernels: tuple[type, ...]
    baseline: type

    def attention_request(self, dtype, *, D: int = 64, T: int = 128, causal: bool = True):
        from gptlab.core.attention import AttentionRequest

        return AttentionRequest(device=self.device, dtype=dtype, head_dim=D, q_len=T, k_len=T,
                                causal=causal)

    def kernel_request(self, dtype):
        from gptlab.core.layer_kernels import KernelRequest

        return KernelRequest(device=self.device, dtype=dtype)


def cuda_target(reg) -> Target:
    """Every attention backend and layer kernel registered from this package that declares
    ``cuda`` (a tensor-core backend added to the package is found here)."""
    attention = tuple(cls for _, cls in sorted(reg.attention_backends.items())
                      if _ours(cls) and "cuda" in cls.devices)
    layer = tuple(cls for _, cls in sorted(reg.layer_kernels.items())
                  if _ours(cls) and "cuda" in cls.devices)
    return Target("cuda", False, attention, layer, reg.attention_backend("sdpa"))


def emulated_target(reg) -> Target:
    """The emulated twins (``*-emu``) of this package's CUDA kernels, on CPU tensors."""
    from gptlab.verify import emulated

    attention = tuple(sorted((c for c in _subclasses(emulated.Emulated)
                              if _ours(c, EMULATED_PACKAGE) and getattr(c, "name", None)),
                             key=lambda c: c.name))
    layer = tuple(sorted((c for c in [emulated.EmulatedNativeKernels,
                                      *_subclasses(emulated.EmulatedNativeKernels)]
                          if _ours(c, EMULATED_PACKAGE)), key=lambda c: c.name))
    return Target("cpu", True, attention, layer, reg.attention_backend("sdpa"))


def require_gpu() -> None:
    """A typed one-line error where torch sees no CUDA GPU."""
    from gptlab.core.devices import device_unavailable_reason

    why = device_unavailable_reason("cuda")
    if why:
        raise DeviceError(f"no CUDA GPU visible to torch: {why}; run gpucheck on a GPU machine, "
                          f"or add --emulate for a rehearsal on the CPU with the emulated kernels")


# ------------------------------------------------------------------ the check
@attrs.frozen
class Options:
    B: int = 8
    H: int = 12
    T: int = 2048
    head_dims: tuple[int, ...] = (64, 128)
    reps: int = 10
    warmup: int = 3
    rule_T: int = 2048  # the precision rule's long causal sequence
    sanitizer_timeout_s: float = 120.0
    sections: tuple[str, ...] = SECTIONS
    quick: bool = False  # float32 conformance on QUICK_SEQ_LENS x QUICK_HEAD_DIMS only

    @classmethod
    def emulated(cls, **overrides) -> Options:
        """Small enough for the emulator (a fiber per CUDA thread): seconds, not hours."""
        return cls(**{"B": 1, "H": 2, "T": 64, "head_dims": (32,), "reps": 3, "warmup": 1,
                      "rule_T": 256, **overrides})


class GpuCheck:
    """The four sections against one :class:`Target`; :meth:`run` returns the :class:`Report`."""

    def __init__(self, reg, target: Target, options: Options = Options(),
                 progress: Callable[[str], object] = lambda _: None):
        self.reg, self.target, self.opts, self.progress = reg, target, options, progress

    def run(self, command: str = "gpt kernels gpucheck") -> Report:
        report = Report(self.title(), header=[
            f"`{command}`, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
            + (" -- **emulated**: the .cu kernels run on the CPU by the CUDA emulator; times "
               "and the GPU limits below are not a GPU's" if self.target.emulated else "")])
        steps = {"environment": self.environment, "conformance": self.conformance,
                 "sanitizer": self.sanitizer, "benchmark": self.benchmark}
        chosen = [s for s in SECTIONS if s in self.opts.sections]
        for i, name in enumerate(chosen, 1):
            report.sections.append(run_section(
                name, steps[name], lambda m, i=i: self.progress(f"[{i}/{len(chosen)}] {m}")))
        return report

    def title(self) -> str:
        if self.target.emulated:
            return "gpucheck: emulated CUDA kernels on the CPU"
        if self.target.device != "cuda":
            return f"gpucheck: kernels on {self.target.device}"
        import torch

        return f"gpucheck: {torch.cuda.get_device_name()}"

    # ---------------------------------------------------------------- environment
    def environment(self, s: Section) -> None:
        import platform

        import torch

        from gptlab.plugins.cuda_kernels import build, loader

        t = self.target
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
        s.lines += table(["", ""], rows)
        s.add()
        if mismatch := build.cuda_version_mismatch():
            s.fail(f"- FAIL: {mismatch}")
        for flavour in ([build.CUDA_EMU] if t.emulated else []) + [build.CUDA]:
            if t.emulated and build.missing_compiler_reason(flavour):
                s.add(f"- {flavour.name}: not built: {build.missing_compiler_reason(flavour)}")
                continue
            start = time.perf_counter()
            self.progress(f"building the {flavour.name} kernels")
            path = build.build(flavour)
            lib = loader.NativeLibrary(path)
            s.add(f"- {flavour.name}: `{path}` ({time.perf_counter() - start:.1f} s)")
            if flavour is build.CUDA:
                count, why = lib.cuda_device_count()
                if not t.emulated and (why or count == 0):
                    s.fail(f"- FAIL: the CUDA kernels find no usable GPU: {why or 'count 0'}")
                elif not t.emulated:
                    s.add(f"- the CUDA kernels see {count} GPU(s)")
                self._ptxas(s, path, limits)

    def _ptxas(self, s: Section, path: Path, limits: SmLimits) -> None:
        from gptlab.plugins.cuda_kernels import build

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

    # ---------------------------------------------------------------- conformance
    def conformance(self, s: Section) -> None:
        import torch

        from gptlab.testing import (GRAD_TOL, OUT_TOL, Case, check_layer_kernels,
                                    check_precision, default_cases, run_conformance)

        t, dev = self.target, self.target.device
        for cls, dtype, label in self._runnable(s, t.attention, t.attention_request, ""):
            self.progress(f"conformance: {cls.name} {_dtype_name(dtype)}")
            start = time.perf_counter()
            try:
                if dtype == torch.float32:
                    cases = (default_cases(cls, seq_lens=QUICK_SEQ_LENS,
                                           head_dims=QUICK_HEAD_DIMS)
                             if self.opts.quick else None)
                    results = run_conformance(cls(), device=dev, cases=cases)
                    s.add(f"- pass {label}: {len(results)} cases, worst out err "
                          f"{max(r.out_error for r in results):.1e} (tol {OUT_TOL:g}), "
                          f"grad err {max(r.grad_error for r in results):.1e} (tol "
                          f"{GRAD_TOL:g}), {time.perf_counter() - start:.1f} s")
                else:  # below float32: the precision rule on a few shapes
                    shapes = [Case(1, 1, T, T, D, c) for T in (65, 255)
                              for D in (64, 128) if cls.min_head_dim <= D <= cls.max_head_dim
                              for c in (True, False)]
                    results = [check_precision(cls(), T=c.tq, D=c.hs, causal=c.causal,
                                               device=dev, dtype=dtype) for c in shapes]
                    bad = [r for r in results if not r.ok]
                    if bad:
                        raise AssertionError(f"{len(bad)}/{len(results)} shapes fail the "
                                             f"precision rule:\n" + "\n".join(map(str, bad)))
                    s.add(f"- pass {label}: precision rule on {len(results)} shapes, worst "
                          f"error / torch's {max(r.worst_ratio for r in results):.2f}")
            except Exception as e:  # a wrong result, or an error: the next one still runs
                lines = str(e).splitlines() or [""]
                kind = "" if isinstance(e, AssertionError) else f"({type(e).__name__}) "
                s.fail(f"- FAIL {label}: {kind}{lines[0]}")
                s.lines += [f"    - {ln}" for ln in lines[1:11]]
        s.add()
        for cls in t.attention:
            for dtype in _dtypes(cls):
                if cls.not_supported_reasons(t.attention_request(dtype, T=self.opts.rule_T)):
                    continue
                self.progress(f"precision rule at T={self.opts.rule_T}: {cls.name} "
                              f"{_dtype_name(dtype)}")
                try:
                    r = check_precision(cls(), T=self.opts.rule_T, D=64, causal=True,
                                        device=dev, dtype=dtype)
                except Exception as e:
                    s.fail(f"- FAIL precision rule, causal T={self.opts.rule_T} D=64: "
                           f"`{cls.name}` {_dtype_name(dtype)}: ({type(e).__name__}) "
                           f"{first_line(e)}")
                    continue
                line = f"precision rule, causal T={self.opts.rule_T} D=64: {r}"
                if r.ok:
                    s.add(f"- pass {line}")
                else:
                    s.fail(f"- FAIL {line}")
        s.add()
        for cls, dtype, label in self._runnable(s, t.layer_kernels, t.kernel_request,
                                                "layer kernels "):
            self.progress(f"conformance: layer kernels {cls.name} {_dtype_name(dtype)}")
            try:
                results = check_layer_kernels(cls(), device=dev, dtype=dtype)
            except Exception as e:
                s.fail(f"- FAIL {label}: ({type(e).__name__}) {first_line(e)}")
                continue
            bad = [r for r in results if not r.ok]
            if bad:
                s.fail(f"- FAIL {label}: {len(bad)}/{len(results)} cases")
                s.lines += [f"    - {r}" for r in bad[:10]]
            else:
                worst = max(results, key=lambda r: r.grad_error / r.grad_tol)
                s.add(f"- pass {label}: {len(results)} cases (LayerNorm, linear + GELU, "
                      f"cross-entropy), worst: {worst}")

    @staticmethod
    def _runnable(s: Section, classes, request, kind: str):
        """(cls, dtype, label) for each class and each dtype it declares that runs on the
        target; a skip line with the reasons for each that does not."""
        for cls in classes:
            for dtype in _dtypes(cls):
                label = f"{kind}`{cls.name}` {_dtype_name(dtype)}"
                reasons = cls.not_supported_reasons(request(dtype))
                if reasons:
                    s.add(f"- skip {label}: {'; '.join(reasons)}")
                else:
                    yield cls, dtype, label

    # ---------------------------------------------------------------- sanitizer
    def sanitizer(self, s: Section) -> None:
        tool = shutil.which("compute-sanitizer")
        if tool is None:
            s.add("- compute-sanitizer is missing (not on PATH): memcheck, racecheck and "
                  "synccheck not run")
            return
        smoke = [sys.executable, "-m", __name__, "smoke"] + (
            ["--emulate"] if self.target.emulated else [])
        s.add(f"Each tool runs `{' '.join(['python', '-m', __name__, 'smoke'] + smoke[4:])}` "
              f"(every kernel once, small shapes) with PYTORCH_NO_CUDA_MEMORY_CACHING=1:")
        s.add()
        env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "PYTHONUNBUFFERED": "1"}
        for name in SANITIZER_TOOLS:
            self.progress(f"compute-sanitizer --tool {name}")
            cmd = [tool, "--tool", name, "--error-exitcode", "97", *smoke]
            start = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                      timeout=self.opts.sanitizer_timeout_s)
            except subprocess.TimeoutExpired:
                s.fail(f"- FAIL {name}: timed out after {self.opts.sanitizer_timeout_s:g} s")
                continue
            out = proc.stdout + proc.stderr
            summary = next((ln.strip("= ").strip() for ln in reversed(out.splitlines())
                            if "ERROR SUMMARY" in ln), None)
            took = f"{time.perf_counter() - start:.1f} s"
            if proc.returncode == 0:
                s.add(f"- pass {name}: {summary or 'no errors'} ({took})")
                continue
            s.fail(f"- FAIL {name} (exit {proc.returncode}): {summary or 'see below'} ({took})")
            errors = [ln.strip("= ").strip() for ln in out.splitlines()  # the tool's own lines
                      if ln.startswith("=========") and "COMPUTE-SANITIZER" not in ln
                      and "ERROR SUMMARY" not in ln and ln.strip("= ")]
            tail = errors[:8] or out.strip().splitlines()[-8:]
            s.lines += [f"    - `{first_line(ln, 200)}`" for ln in tail if ln.strip()]

    # ---------------------------------------------------------------- benchmark
    def benchmark(self, s: Section) -> None:
        import torch

        o, t = self.opts, self.target
        cuda = t.device == "cuda"
        timer = cuda_event_timer if cuda else perf_counter_timer
        peak = cuda_peak_mib if cuda else None
        s.add(f"B={o.B} H={o.H} T={o.T}, median of {o.reps} after {o.warmup} warm-up, "
              f"{'CUDA events' if cuda else 'wall time (CPU)'}; FLOPs 4·B·H·T²·D forward, "
              f"halved when causal, forward+backward 3.5x; 'x sdpa' is time over sdpa's in the "
              f"same dtype; peak MiB is the forward+backward's rise of max_memory_allocated.")
        s.add()
        rows = []
        dtypes = sorted({d for cls in t.attention for d in cls.dtypes},
                        key=lambda d: (d != torch.float32, _dtype_name(d)))
        for dtype in dtypes:
            for D in o.head_dims:
                for causal in (True, False):
                    req = t.attention_request(dtype, D=D, T=o.T, causal=causal)
                    base = None
                    for cls in (t.baseline, *[c for c in t.attention if dtype in c.dtypes]):
                        label = [f"`{cls.name}`", _dtype_name(dtype), D,
                                 "yes" if causal else "no"]
                        reasons = cls.not_supported_reasons(req)
                        if reasons:
                            rows.append(label + [f"unsupported: {'; '.join(reasons)}"]
                                        + [""] * 7)
                            continue
                        self.progress(f"benchmark: {cls.name} {_dtype_name(dtype)} D={D} "
                                      f"causal={causal}")
                        try:
                            m = measure_attention(cls(), B=o.B, H=o.H, T=o.T, D=D,
                                                  causal=causal, dtype=dtype, device=t.device,
                                                  reps=o.reps, warmup=o.warmup, timer=timer,
                                                  peak=peak)
                        except Exception as e:  # out of memory, a launch error: this row only
                            s.failed = True
                            rows.append(label + [f"error: {type(e).__name__}: "
                                                 f"{first_line(e, 150)}"] + [""] * 7)
                            if cuda:
                                torch.cuda.empty_cache()
                            continue
                        base = base or (m if cls is t.baseline else None)
                        rows.append(label + m.cells(base))
        s.lines += table(["backend", "dtype", "D", "causal", "fwd ms", "fwd TFLOP/s",
                          "fwd x sdpa", "fwd+bwd ms", "fwd+bwd TFLOP/s", "fwd+bwd x sdpa",
                          "peak MiB", "peak x sdpa"], rows)
        if s.failed:
            s.add()
            s.add("- FAIL: a benchmark row raised (see 'error' above)")


@attrs.frozen
class Measurement:
    fwd: Timing
    fwd_bwd: Timing
    fwd_flops: float
    fwd_bwd_flops: float
    peak_mib: float | None

    def cells(self, base: Measurement | None) -> list[str]:
        def ratio(a, b):
            return f"{a / b:.2f}" if b else "-"

        return [f"{self.fwd.median_s * 1e3:.2f}",
                f"{self.fwd_flops / self.fwd.median_s / 1e12:.3g}",
                ratio(self.fwd.median_s, base and base.fwd.median_s),
                f"{self.fwd_bwd.median_s * 1e3:.2f}",
                f"{self.fwd_bwd_flops / self.fwd_bwd.median_s / 1e12:.3g}",
                ratio(self.fwd_bwd.median_s, base and base.fwd_bwd.median_s),
                "n/a" if self.peak_mib is None else f"{self.peak_mib:.1f}",
                ratio(self.peak_mib, base and base.peak_mib) if self.peak_mib is not None
                else "-"]


def measure_attention(attn, *, B: int, H: int, T: int, D: int, causal: bool, dtype, device: str,
                      reps: int, warmup: int, timer: Callable[[Callable], float],
                      peak: Callable[[Callable], float] | None = None) -> Measurement:
    """Forward (no grad) and forward+backward median times of ``attn`` on (B, H, T, D) inputs,
    and the forward+backward's peak memory where ``peak`` measures it."""
    import torch

    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, T, D, generator=gen).to(device=device, dtype=dtype)
                     for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def forward():
        with torch.no_grad():
            attn(q, k, v, causal=causal)

    def forward_backward():
        attn(q, k, v, causal=causal).backward(dout)
        q.grad = k.grad = v.grad = None

    fwd = median_time(forward, timer=timer, reps=reps, warmup=warmup)
    fwd_bwd = median_time(forward_backward, timer=timer, reps=reps, warmup=warmup)
    mib = peak(forward_backward) if peak else None
    return Measurement(fwd, fwd_bwd, attention_flops(B, H, T, T, D, causal=causal),
                       attention_flops(B, H, T, T, D, causal=causal, backward=True), mib)


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


def default_out(target: Target) -> Path:
    if target.emulated:
        return DEFAULT_RESULTS / "gpucheck-emulated.md"
    import torch

    return DEFAULT_RESULTS / f"gpucheck-{slug(torch.cuda.get_device_name())}.md"


# ------------------------------------------------------------------ the small-case run
def smoke(target: Target) -> list[str]:
    """Run every kernel of ``target`` once on small shapes (the run compute-sanitizer watches):
    each attention backend per supported dtype at head dims 32, 64 and 128 (the CUDA flash
    kernel's three register layouts), causal and not, forward and backward; each layer kernel's
    three operations, forward and backward. Returns one line per call."""
    import torch
    import torch.nn as nn

    done, dev = [], target.device
    gen = torch.Generator().manual_seed(0)
    for cls in target.attention:
        for dtype in _dtypes(cls):
            for D in (32, 64, 128):
                for causal in (True, False):
                    if cls.not_supported_reasons(target.attention_request(dtype, D=D, T=65,
                                                                          causal=causal)):
                        continue
                    q, k, v = (torch.randn(1, 2, 65, D, generator=gen).to(dev, dtype)
                               .requires_grad_() for _ in range(3))
                    cls()(q, k, v, causal=causal).sum().backward()
                    done.append(f"{cls.name} {_dtype_name(dtype)} D={D} causal={causal}")
    for cls in target.layer_kernels:
        for dtype in _dtypes(cls):
            if cls.not_supported_reasons(target.kernel_request(dtype)):
                continue
            kern = cls()
            x = torch.randn(33, 65, generator=gen).to(dev, dtype).requires_grad_()
            w, b = (torch.randn(65, generator=gen).to(dev, dtype).requires_grad_()
                    for _ in range(2))
            kern.layer_norm(x, w, b, 1e-5).sum().backward()
            linear = nn.Linear(65, 130).to(dev, dtype)
            kern.linear_gelu(x, linear).sum().backward()
            logits = torch.randn(33, 130, generator=gen).to(dev, dtype).requires_grad_()
            kern.cross_entropy(logits, torch.randint(0, 130, (33,), generator=gen).to(dev)
                               ).backward()
            done.append(f"{cls.name} {_dtype_name(dtype)}: layer_norm, linear_gelu, "
                        f"cross_entropy")
    if dev == "cuda":
        torch.cuda.synchronize()
    return done


def _smoke_main(argv: list[str]) -> int:
    from gptlab.core.plugins import load_registry

    reg = load_registry()
    emulate = "--emulate" in argv
    if not emulate:
        require_gpu()
    target = emulated_target(reg) if emulate else cuda_target(reg)
    for line in smoke(target):
        print(f"smoke: {line}")  # noqa: T201 (a script's output)
    return 0


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    args = sys.argv[1:]
    if not args or args[0] != "smoke":
        sys.exit(f"usage: python -m {PACKAGE}.gpucheck smoke [--emulate]")
    sys.exit(_smoke_main(args[1:]))
