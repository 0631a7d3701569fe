"""Build the native kernel libraries on first use, into a content-addressed cache.

Five *flavours* share this machinery:

- ``cpu``: the C kernels in ``csrc/cpu/``, by ``$CC`` (default ``cc``);
- ``cuda``: the ``.cu`` kernels in ``csrc/cuda/``, by ``$NVCC`` (default ``nvcc``), with
  ``-lineinfo`` (compute-sanitizer names source lines) and cudart linked statically so the
  library loads on a machine without a driver (see "CUDA versions" below); for the GPUs torch
  sees (:func:`arch_plan`: SASS for each one's architecture, PTX of the newest for later GPUs),
  or, where it sees none, for sm_80 and sm_90 plus compute_90 PTX;
- ``cuda-emu``: the same ``.cu`` files by ``$CXX`` (default ``c++``) against the CUDA emulator
  (:data:`EMU_DIR`, ``gptlab/verify/emu/``: on the include path, its ``cuda_emu.cpp`` compiled
  in; found by path, so the runtime imports nothing of the verification tools): the CUDA kernels
  run on the CPU, for verification without a GPU; ``cuda-emu-racecheck``: the same with the
  emulator's race detector (``-DGL_EMU_RACECHECK``); ``cuda-emu-numerics``: the same with a
  GPU's numerics (``-DGL_EMU_GPU_NUMERICS``: FMA contraction, math functions off by their GPU
  error, subnormals flushed by atomicAdd, mma in another order). nvcc never sees the emulator.

Each is compiled into ``<cache>/<flavour>-<key>/libgptlab_<flavour>.so`` where ``key`` hashes the
sources and headers (the emulator's too, for its flavours), the flags, the compiler's version,
torch's version, the ABI version and (for ``-march=native``) the CPU's flags; the compiler's
output is kept beside it in ``build.log`` (for ``cuda``, ptxas' register / spill / shared-memory
report: :func:`resource_report`). The cache folder is ``$GPTLAB_KERNEL_CACHE`` or
``~/.cache/gptlab/kernels``. Flags never include ``-Ofast`` / ``-ffast-math`` /
``--use_fast_math``: masking relies on -inf.

A library is never loaded unverified (dlopen of a truncated file dies with SIGBUS): the build
records its size and sha256 in ``library.json`` beside it, and :func:`build` (which every load goes
through) and :func:`cached_library` check them first. A library that is truncated, replaced, or
has no record (built by an older gptlab) is rebuilt; :func:`build` returns only a library that
matches its record. A build holds an ``fcntl`` lock on ``<cache>/<flavour>-<key>.lock`` (released
by the kernel if the holder dies) that holds the holder's pid; a waiting build logs one warning
naming it and gives up after :data:`LOCK_TIMEOUT_S`. Under the lock it removes the ``.tmp`` files
a killed build left, compiles into a temporary file, fsyncs it and renames it into place, then
writes the record. Any ``OSError`` from the cache (a file where a folder must be, a lock that is a
folder, a read-only disk) is a one-line :class:`KernelBuildError`, so ``auto`` moves on.

CUDA versions. The library carries the CUDA runtime of the nvcc that built it (static cudart), and
a CUDA runtime needs a driver that supports its CUDA major version (CUDA 13 needs a Linux driver
>= 580); torch's CUDA build carries its own runtime, so torch can work where our library cannot
(torch built for CUDA 12.x on a 550 driver, nvcc 13.0 here). Linking against torch's runtime
instead would not help: a library compiled by nvcc 13 needs a CUDA 13 runtime whichever copy it
uses, and torch's is CUDA 12 in that case; the remedy is an nvcc of the driver's major version
(``$NVCC``) or a newer driver. So the runtime stays static (the library loads anywhere and
reports instead of failing to load), and :func:`cuda_version_mismatch` names the mismatch in one
line before anything is loaded (nvcc's CUDA version against the driver's, read from torch or from
``libcuda``): the CUDA backends give it as their reason, so ``gpt backends --device cuda`` and a
named backend say so instead of "no usable GPU". Within one major version the runtime's
minor-version compatibility runs SASS on an older driver, but PTX needs a driver at least as new
as the nvcc that produced it (else every launch fails with cudaErrorUnsupportedPtxVersion): the
library is built with SASS for the GPU that is there, and where nvcc does not know that GPU (so
it would run PTX) a driver older than nvcc, minor version included, is the reason given. The
library itself counts only the GPUs it can run (csrc/cuda/runtime.cu).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import attrs

from gptlab.core.errors import GptlabError, first_line
from gptlab.core.files import TMP_SUFFIX, atomic_path, atomic_write
from gptlab.core.paths import KERNEL_CACHE_ENV, kernel_cache_dir
from gptlab.plugins.cuda_kernels.abi import ABI_VERSION, CSRC, HEADER

log = logging.getLogger(__name__)

#: The CUDA emulator's sources (cuda_emu.h, cuda_emu.cpp, ...), which only the emulated flavours
#: compile against.
EMU_DIR = Path(__file__).resolve().parents[2] / "verify" / "emu"

#: How long a build waits for another process's build of the same library, and how long one
#: compile may take (nvcc takes minutes); module constants so that tests can shorten them.
LOCK_TIMEOUT_S = 600.0
COMPILE_TIMEOUT_S = 600.0
#: Beside each library: ``{"size": bytes, "sha256": hex}``, written by the build.
RECORD = "library.json"
NOT_BUILT = "not built yet"


class KernelBuildError(GptlabError):
    """A native library could not be compiled or loaded."""


@attrs.frozen(cache_hash=True)  # a key of loader's dict, looked up on every kernel call
class Flavour:
    name: str
    compiler_env: str  # environment variable naming the compiler
    default_compiler: str
    sources: tuple[str, ...]  # relative to csrc/ (or absolute)
    headers: tuple[str, ...]  # glob patterns relative to csrc/, hashed into the key
    flags: tuple[str, ...]
    include_dirs: tuple[Path, ...] = ()  # besides csrc/ (-I); their *.h are hashed into the key
    device: str = "cpu"  # the torch device type of the tensors its kernels take
    native_cpu: bool = False  # flags depend on the build machine's CPU
    install_hint: str = ""
    #: Flags decided when building, after ``flags`` (the cuda flavour's architectures).
    more_flags: Callable[[], tuple[str, ...]] | None = None

    def compiler(self) -> str:
        return os.environ.get(self.compiler_env) or self.default_compiler

    def all_flags(self) -> tuple[str, ...]:
        """``flags``, with ``-march=native`` replaced by ``-march=$GPTLAB_CPU_MARCH`` where that
        is set (e.g. ``haswell`` for AVX2, ``x86-64`` for SSE2 only: a library for another class
        of CPU than the building one, or this one's speed as such a CPU's), then what
        ``more_flags`` gives here and now."""
        march = os.environ.get(MARCH_ENV, "").strip()
        flags = self.flags if not march else tuple(
            f"-march={march}" if f == "-march=native" else f for f in self.flags)
        return (*flags, *(self.more_flags() if self.more_flags else ()))


#: Names the CPU the C kernels are built for (``-march``); default: this machine's (native).
MARCH_ENV = "GPTLAB_CPU_MARCH"


CPU = Flavour(
    name="cpu", compiler_env="CC", default_compiler="cc",
    sources=("cpu/runtime.c", "cpu/softmax.c", "cpu/flash.c", "cpu/layernorm.c",
             "cpu/cross_entropy.c", "cpu/bias_gelu.c", "cpu/decode.c"), headers=("cpu/*.h",),
    flags=("-O3", "-march=native", "-std=gnu11", "-fPIC", "-shared", "-fopenmp",
           "-fno-math-errno", "-Wall", "-Wextra", "-Werror"),
    native_cpu=True, install_hint="install gcc or set CC",
)
CUDA_SOURCES = ("cuda/runtime.cu", "cuda/softmax.cu", "cuda/flash.cu", "cuda/flash_tc.cu",
                "cuda/layernorm.cu", "cuda/cross_entropy.cu", "cuda/bias_gelu.cu")
CUDA_HEADERS = ("cuda/*.cuh",)


# ------------------------------------------------------------------ CUDA architectures
#: The oldest architecture the kernels run on (cp.async, ldmatrix, bfloat16 mma: sm_80).
MIN_ARCH = 80
#: Where torch sees no GPU: SASS for Ampere (sm_80) and Hopper (sm_90), and compute_90 PTX.
DEFAULT_ARCHS = (80, 90)


@attrs.frozen
class ArchPlan:
    """What the ``cuda`` flavour is compiled for: SASS for each architecture of ``sass`` and PTX
    of the newest, which the driver compiles at load for a GPU newer than all of them; ``jit``
    names the GPUs here that will run that PTX (nvcc knows no architecture they run as SASS)."""

    sass: tuple[int, ...]
    jit: tuple[str, ...] = ()

    def flags(self) -> tuple[str, ...]:
        *older, newest = self.sass
        out = [f for a in older for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
        return (*out, "-gencode", f"arch=compute_{newest},code=[sm_{newest},compute_{newest}]")


def gpu_capabilities() -> list[tuple[int, int]]:
    """The compute capability of each GPU torch sees (none where torch has no CUDA); creates no
    CUDA context."""
    import torch

    try:
        if not torch.cuda.is_available():
            return []
        return [tuple(torch.cuda.get_device_capability(i))
                for i in range(torch.cuda.device_count())]
    except Exception:  # a broken driver: the CUDA backends' reasons say so
        return []


@functools.cache
def _nvcc_archs(compiler: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([*shlex.split(compiler), "--list-gpu-arch"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    archs = tuple(sorted({int(a) for a in re.findall(r"compute_(\d+)\b", out)}))
    return archs or None


def nvcc_archs() -> tuple[int, ...] | None:
    """The virtual architectures ``$NVCC`` compiles for (``nvcc --list-gpu-arch``: 80, 86, ...,
    120), or None where it cannot say."""
    return _nvcc_archs(CUDA.compiler()) if find_compiler(CUDA) else None


def arch_plan(capabilities: list[tuple[int, int]] | None = None,
              known: tuple[int, ...] | None = None) -> ArchPlan:
    """The architectures to build for the GPUs here (``capabilities``: torch's; ``known``:
    nvcc's, None = trust the GPUs). Per GPU of compute capability X.Y >= 8.0 (older ones are the
    library's reasons): sm_XY where nvcc knows it; else the newest sm_XZ (Z <= Y) nvcc knows, whose
    SASS runs on X.Y (the CUDA binary compatibility rule); else the newest older architecture,
    whose PTX the driver compiles (``jit``). No GPU: :data:`DEFAULT_ARCHS`."""
    caps = gpu_capabilities() if capabilities is None else capabilities
    sass, jit = set(), []
    for i, (major, minor) in enumerate(caps):
        cc = 10 * major + minor
        if cc < MIN_ARCH:
            continue
        same = [a for a in known if a // 10 == major and a <= cc] if known else [cc]
        older = [a for a in known or () if MIN_ARCH <= a <= cc]
        if same:
            sass.add(max(same))
        elif older:
            sass.add(max(older))
            jit.append(f"GPU {i} (compute capability {major}.{minor})")
    return ArchPlan(tuple(sorted(sass)), tuple(jit)) if sass else ArchPlan(DEFAULT_ARCHS)


def cuda_arch_flags() -> tuple[str, ...]:
    """The ``-gencode`` flags of :func:`arch_plan` for this machine's GPUs and nvcc."""
    return arch_plan(known=nvcc_archs()).flags()


CUDA = Flavour(
    name="cuda", compiler_env="NVCC", default_compiler="nvcc",
    sources=CUDA_SOURCES, headers=CUDA_HEADERS,
    flags=("-O3", "-std=c++17", "-shared", "-lineinfo", "-Xcompiler", "-fPIC,-Wall,-Wextra",
           "--cudart", "static", "-Xptxas", "-v", "-Werror", "all-warnings"),
    device="cuda", install_hint="install the CUDA toolkit or set NVCC",
    more_flags=cuda_arch_flags,
)
CUDA_EMU = Flavour(
    name="cuda-emu", compiler_env="CXX", default_compiler="c++",
    sources=(*CUDA_SOURCES, str(EMU_DIR / "cuda_emu.cpp")), headers=CUDA_HEADERS,
    flags=("-x", "c++", "-std=c++20", "-O2", "-fPIC", "-shared", "-U_FORTIFY_SOURCE", "-pthread",
           "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas"),
    include_dirs=(EMU_DIR,),
    install_hint="install g++ or set CXX",
)
#: The emulator with its race detector (GL_SMEM_PTR / GL_GLOBAL_PTR become watched pointers):
#: several times slower than cuda-emu, for small cases (tests/kernels/test_mutations.py).
CUDA_EMU_RACECHECK = attrs.evolve(CUDA_EMU, name="cuda-emu-racecheck",
                                  flags=(*CUDA_EMU.flags, "-DGL_EMU_RACECHECK"))


def _fma_flags() -> tuple[str, ...]:
    """``-mfma`` on an x86 CPU that has FMA (other CPUs: FMA is in the base instruction set, or
    absent and contraction does nothing)."""
    x86 = platform.machine() in ("x86_64", "AMD64")
    return ("-mfma",) if x86 and re.search(r"\bfma\b", _cpu_flags()) else ()


#: The emulator with a GPU's numerics (-DGL_EMU_GPU_NUMERICS, emu/cuda_emu.h): a * b + c
#: contracted into FMAs as ptxas may (-ffp-contract=fast), exp2f and the other math functions off
#: by up to their GPU error, subnormals flushed by atomicAdd, mma summed in another order.
CUDA_EMU_NUMERICS = attrs.evolve(
    CUDA_EMU, name="cuda-emu-numerics",
    flags=(*CUDA_EMU.flags, "-DGL_EMU_GPU_NUMERICS", "-ffp-contract=fast"),
    more_flags=_fma_flags, native_cpu=True)
FLAVOURS = {f.name: f for f in (CPU, CUDA, CUDA_EMU, CUDA_EMU_RACECHECK, CUDA_EMU_NUMERICS)}


def cache_root() -> Path:
    return kernel_cache_dir()


def find_compiler(flavour: Flavour) -> str | None:
    """Absolute path of the flavour's compiler, or None if it is not installed."""
    cmd = shlex.split(flavour.compiler())
    return shutil.which(cmd[0]) if cmd else None


def _compiler_version(flavour: Flavour) -> str:
    cmd = shlex.split(flavour.compiler()) + ["--version"]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"cannot run {flavour.compiler()!r}: {e}") from None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build_key(flavour: Flavour) -> str:
    import torch

    h = hashlib.sha256()
    files = sorted({HEADER, *(CSRC / s for s in flavour.sources),
                    *(f for pattern in flavour.headers for f in CSRC.glob(pattern)),
                    *(f for folder in flavour.include_dirs for f in folder.glob("*.h"))})
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    flags = flavour.all_flags()
    h.update(" ".join(flags).encode())
    h.update(_compiler_version(flavour).encode())
    h.update(torch.__version__.encode())
    h.update(str(ABI_VERSION).encode())
    h.update(platform.machine().encode())
    if flavour.native_cpu and "-march=native" in flags:
        h.update(_cpu_flags().encode())
    return h.hexdigest()[:16]


def library_path(flavour: Flavour, key: str) -> Path:
    return cache_root() / f"{flavour.name}-{key}" / f"libgptlab_{flavour.name.replace('-', '_')}.so"


def _lock(path: Path, flavour: Flavour) -> int:
    """Take the build lock and write our pid into it; while another process holds it, warn once
    (naming its pid) and give up after :data:`LOCK_TIMEOUT_S`. Closing the fd releases it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def holder() -> str:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return (f"another build of the {flavour.name} kernels (pid "
                f"{pid if pid.isdigit() else 'unknown'}, lock {path})")

    deadline, warned = time.monotonic() + LOCK_TIMEOUT_S, False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            if not warned:
                log.warning("waiting for %s", holder())
                warned = True
            if time.monotonic() > deadline:
                raise KernelBuildError(
                    f"timed out after {LOCK_TIMEOUT_S:g}s waiting for {holder()}; if that "
                    f"process is stuck, end it, or set {KERNEL_CACHE_ENV} to another folder")
            time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _cache_error(e: OSError) -> KernelBuildError:
    """An OSError from the cache folder, as one line naming the path and the fix."""
    path = e.filename2 or e.filename or cache_root()
    # every mkdir here passes exist_ok: EEXIST means a file stands where a folder must be
    why = os.strerror(errno.ENOTDIR) if e.errno == errno.EEXIST else (e.strerror or str(e))
    return KernelBuildError(f"cannot use the kernel cache {path}: {first_line(why, 80)}; set "
                            f"{KERNEL_CACHE_ENV} to a writable folder")


def _digest(path: Path) -> dict:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def library_problem(lib: Path) -> str | None:
    """Why the library must not be loaded: :data:`NOT_BUILT`, or how it differs from the size
    and sha256 its build recorded; None when it matches."""
    record_path = lib.with_name(RECORD)
    try:
        if not lib.is_file():
            return NOT_BUILT
        if not record_path.is_file():
            return "it has no size/sha256 record (built by an older gptlab)"
        record, actual = json.loads(record_path.read_text()), _digest(lib)
    except (OSError, ValueError) as e:
        return f"it or its record cannot be read ({first_line(e, 120)})"
    if record == actual:
        return None
    recorded = record.get("size") if isinstance(record, dict) else None
    if recorded != actual["size"]:
        return f"it is {actual['size']} bytes, its record says {recorded} (truncated or replaced)"
    return "its sha256 differs from its record (corrupted or replaced)"


def get_flavour(flavour: Flavour | str) -> Flavour:
    if isinstance(flavour, Flavour):
        return flavour
    try:
        return FLAVOURS[flavour]
    except KeyError:
        raise KernelBuildError(f"unknown kernel flavour {flavour!r}; known: "
                               f"{', '.join(FLAVOURS)}") from None


def missing_compiler_reason(flavour: Flavour | str) -> str | None:
    """One line saying the flavour's compiler is missing, or None if it is installed."""
    flavour = get_flavour(flavour)
    if find_compiler(flavour) is not None:
        return None
    return (f"compiler for the {flavour.name} kernels not found ({flavour.compiler()!r}; "
            f"{flavour.install_hint})")


def cached_library(flavour: Flavour | str) -> Path | None:
    """The flavour's library if it is built and verified (never compiles), else None."""
    flavour = get_flavour(flavour)
    if find_compiler(flavour) is None:
        return None
    lib = library_path(flavour, build_key(flavour))
    return lib if library_problem(lib) is None else None


def build(flavour: Flavour | str = CPU, *, force: bool = False) -> Path:
    """Return the path of the flavour's verified library, compiling it if needed."""
    return build_library(flavour, force=force)[0]


def build_library(flavour: Flavour | str = CPU, *, force: bool = False) -> tuple[Path, str | None]:
    """(the verified library, why a cached one was rebuilt or None): compiles it if it is not
    built, or fails verification, or ``force``. Never returns a library that fails verification."""
    flavour = get_flavour(flavour)
    missing = missing_compiler_reason(flavour)
    if missing:
        raise KernelBuildError(missing)
    lib = library_path(flavour, build_key(flavour))
    try:
        if not force and library_problem(lib) is None:
            return lib, None
        fd = _lock(lib.parent.with_suffix(".lock"), flavour)
        try:
            problem = library_problem(lib)  # another process may have built it while we waited
            if problem is None and not force:
                return lib, None
            damage = None if problem in (None, NOT_BUILT) else problem
            if damage:
                log.warning("rebuilding the %s kernels: the cached %s failed verification: %s",
                            flavour.name, lib, damage)
            _compile(flavour, lib)
            if failed := library_problem(lib):
                raise KernelBuildError(f"the {flavour.name} kernels just built at {lib} fail "
                                       f"verification ({failed}); set {KERNEL_CACHE_ENV} to a "
                                       f"folder on another disk")
        finally:
            os.close(fd)
    except OSError as e:
        raise _cache_error(e) from None
    return lib, damage


def _compile(flavour: Flavour, lib: Path) -> None:
    """Compile into a temporary file renamed over ``lib``, then record its size and sha256.
    Called under the build lock, so the ``.tmp`` files in its folder are a killed build's."""
    lib.parent.mkdir(parents=True, exist_ok=True)
    for stale in lib.parent.glob(f"*{TMP_SUFFIX}"):
        stale.unlink()
    cmd_prefix = [*shlex.split(flavour.compiler()), *flavour.all_flags(), "-I", str(CSRC),
                  *(arg for folder in flavour.include_dirs for arg in ("-I", str(folder)))]
    sources = [str(CSRC / s) for s in flavour.sources]
    with atomic_path(lib) as tmp:  # renamed into place only if the compiler succeeds
        cmd = [*cmd_prefix, "-o", str(tmp), *sources, "-lm"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise KernelBuildError(f"building the {flavour.name} kernels took over "
                                   f"{COMPILE_TIMEOUT_S:g}s and was stopped; retry when the "
                                   f"machine is less busy") from None
        except OSError as e:  # the compiler itself, not the cache
            raise KernelBuildError(f"cannot run {flavour.compiler()!r}: {e.strerror}; "
                                   f"{flavour.install_hint}") from None
        output = proc.stdout + proc.stderr
        atomic_write(lib.parent / "build.log", shlex.join(cmd) + "\n" + output)
        if proc.returncode != 0:
            first = next((ln for ln in output.splitlines() if "error" in ln),
                         output.strip().splitlines()[-1] if output.strip() else "")
            raise KernelBuildError(f"building the {flavour.name} kernels failed: "
                                   f"{first_line(first, 200)} (full log: "
                                   f"{lib.parent / 'build.log'})")
        record = _digest(tmp)
    atomic_write(lib.with_name(RECORD), json.dumps(record))


# ------------------------------------------------------------------ CUDA versions
#: The oldest Linux driver of each CUDA major version (NVIDIA's CUDA toolkit release notes).
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
_RELEASE = re.compile(r"release (\d+)\.(\d+)")


def parse_nvcc_version(text: str) -> tuple[int, int] | None:
    """(major, minor) from ``nvcc --version`` ("Cuda compilation tools, release 13.0, ...")."""
    m = _RELEASE.search(text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def nvcc_cuda_version() -> tuple[int, int] | None:
    """The CUDA version of ``$NVCC``; None if it is missing or says none."""
    if find_compiler(CUDA) is None:
        return None
    try:
        return parse_nvcc_version(_compiler_version(CUDA))
    except KernelBuildError:
        return None


def driver_cuda_version() -> tuple[int, int] | None:
    """The newest CUDA version the installed driver supports (cudaDriverGetVersion, through torch
    where torch is a CUDA build, else through ``libcuda.so.1``); None where there is no driver.
    Needs no GPU and never raises."""
    import torch

    version = 0
    getter = getattr(torch._C, "_cuda_getDriverVersion", None)
    if getter is not None and torch.version.cuda:
        try:
            version = int(getter())
        except Exception:  # torch without a usable driver
            version = 0
    if not version:
        import ctypes

        try:
            libcuda = ctypes.CDLL("libcuda.so.1")
            out = ctypes.c_int(0)
            if libcuda.cuDriverGetVersion(ctypes.byref(out)) == 0:
                version = out.value
        except (OSError, AttributeError):
            version = 0
    return (version // 1000, version % 1000 // 10) if version > 0 else None


def cuda_version_mismatch() -> str | None:
    """One line if the driver cannot run what nvcc builds, else None (also when either version is
    unknown): the CUDA runtime nvcc links in is of a newer major version than the driver's, or
    a GPU here runs PTX (:func:`arch_plan`) that a driver older than nvcc (minor version
    included) cannot compile."""
    nvcc, driver = nvcc_cuda_version(), driver_cuda_version()
    if nvcc is None or driver is None or nvcc <= driver:
        return None
    if nvcc[0] <= driver[0]:
        plan = arch_plan(known=nvcc_archs())
        if not plan.jit:
            return None  # SASS for every GPU here: minor-version compatibility runs it
        return (f"{', '.join(plan.jit)}: nvcc {nvcc[0]}.{nvcc[1]} has no SASS for it, and its "
                f"compute_{max(plan.sass)} PTX needs a driver for CUDA {nvcc[0]}.{nvcc[1]} or "
                f"newer, but the driver supports CUDA {driver[0]}.{driver[1]}: set NVCC to an "
                f"nvcc of CUDA <= {driver[0]}.{driver[1]} or one that knows the GPU, or update "
                f"the driver")
    import torch

    torch_cuda = f"; torch {torch.__version__} uses CUDA {torch.version.cuda}" \
        if torch.version.cuda else ""
    need = MIN_DRIVER.get(nvcc[0])
    return (f"the CUDA kernels are built by nvcc {nvcc[0]}.{nvcc[1]} (CUDA {nvcc[0]} runtime) but "
            f"the driver supports CUDA {driver[0]}.{driver[1]}{torch_cuda}: set NVCC to a CUDA "
            f"{driver[0]}.x nvcc, or update the driver"
            + (f" to >= {need}" if need else ""))


# ------------------------------------------------------------------ ptxas resource report
@attrs.frozen
class KernelResources:
    """ptxas' report for one kernel on one architecture."""

    kernel: str
    arch: str
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack_frame: int  # bytes
    static_smem: int  # bytes (dynamic shared memory is sized at launch)


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def _demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> short readable name (``flash_forward_kernel<4>``); mangled if no c++filt."""
    out = dict(zip(names, names))
    filt = shutil.which("c++filt")
    if filt and names:
        proc = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
        if proc.returncode == 0 and len(proc.stdout.splitlines()) == len(names):
            for mangled, full in zip(names, proc.stdout.splitlines()):
                full = full.replace("(anonymous namespace)::", "").removeprefix("void ")
                out[mangled] = full.split("(")[0]
    return out


def parse_ptxas(log: str) -> list[KernelResources]:
    """Parse nvcc's ``-Xptxas -v`` output into one record per (kernel, architecture)."""
    rows, entry, frame = [], None, None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry, frame = (m.group(1), m.group(2)), None
        elif (m := _FRAME.search(line)) and entry:
            frame = tuple(int(g) for g in m.groups())
        elif (m := _USED.search(line)) and entry and frame:
            rows.append((*entry, int(m.group(1)), frame[1], frame[2], frame[0],
                         int(m.group(2) or 0)))
            entry = frame = None
    names = _demangle(sorted({r[0] for r in rows}))
    return [KernelResources(names[r[0]], *r[1:]) for r in rows]


def resource_report(library: Path) -> list[KernelResources]:
    """ptxas' per-kernel report kept in the ``build.log`` beside a ``cuda`` library."""
    log = library.parent / "build.log"
    return parse_ptxas(log.read_text()) if log.is_file() else []
