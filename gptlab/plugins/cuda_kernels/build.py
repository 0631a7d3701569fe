"""Build the native kernel libraries on first use, into a content-addressed cache.

Each *flavour* (``cpu`` now; ``cuda`` and ``cuda-emu`` share this machinery) is compiled into
``<cache>/<flavour>-<key>/libgptlab_<flavour>.so`` where ``key`` hashes the sources, the flags,
the compiler's version, torch's version, the ABI version and (for ``-march=native``) the CPU's
flags. A build holds an ``fcntl`` lock on ``<cache>/<flavour>-<key>.lock`` (the kernel releases
it if the holder dies), compiles into a temporary file and renames it into place, so concurrent
or killed builds never hang or leave a broken library. The cache folder is
``$GPTLAB_KERNEL_CACHE`` or ``~/.cache/gptlab/kernels``. The compiler is ``$CC`` (default
``cc``). Flags never include ``-Ofast``/``-ffast-math``: masking relies on -inf.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import attrs

from gptlab.core.errors import GptlabError
from gptlab.data.corpora import cache_dir

CSRC = Path(__file__).resolve().parent / "csrc"
HEADER = CSRC / "gptlab_kernels.h"
CACHE_ENV = "GPTLAB_KERNEL_CACHE"
LOCK_TIMEOUT_S = 600.0


class KernelBuildError(GptlabError):
    """A native library could not be compiled or loaded."""


@attrs.frozen
class Flavour:
    name: str
    compiler_env: str  # environment variable naming the compiler
    default_compiler: str
    sources: tuple[str, ...]  # relative to csrc/
    flags: tuple[str, ...]
    native_cpu: bool = False  # flags depend on the build machine's CPU

    def compiler(self) -> str:
        return os.environ.get(self.compiler_env) or self.default_compiler


CPU = Flavour(
    name="cpu", compiler_env="CC", default_compiler="cc",
    sources=("cpu/runtime.c", "cpu/softmax.c", "cpu/flash.c"),
    flags=("-O3", "-march=native", "-std=gnu11", "-fPIC", "-shared", "-fopenmp-simd",
           "-fno-math-errno", "-pthread", "-Wall", "-Wextra", "-Werror"),
    native_cpu=True,
)
FLAVOURS = {f.name: f for f in (CPU,)}


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else cache_dir() / "kernels"


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

    from gptlab.plugins.cuda_kernels import loader

    h = hashlib.sha256()
    files = sorted({HEADER, *(CSRC / s for s in flavour.sources),
                    *CSRC.glob(f"{Path(flavour.sources[0]).parent}/*.h")})
    for f in files:
        h.update(str(f.relative_to(CSRC)).encode())
        h.update(f.read_bytes())
    h.update(" ".join(flavour.flags).encode())
    h.update(_compiler_version(flavour).encode())
    h.update(torch.__version__.encode())
    h.update(str(loader.ABI_VERSION).encode())
    h.update(platform.machine().encode())
    if flavour.native_cpu:
        h.update(_cpu_flags().encode())
    return h.hexdigest()[:16]


def library_path(flavour: Flavour, key: str) -> Path:
    return cache_root() / f"{flavour.name}-{key}" / f"libgptlab_{flavour.name.replace('-', '_')}.so"


def _lock(path: Path, timeout: float):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            if time.monotonic() > deadline:
                os.close(fd)
                raise KernelBuildError(f"timed out after {timeout:.0f}s waiting for the build "
                                       f"lock {path}; another build is stuck (kill it)") from None
            time.sleep(0.05)


def build(flavour: Flavour | str = CPU, *, force: bool = False) -> Path:
    """Return the path of the flavour's library, compiling it if it is not cached."""
    flavour = FLAVOURS[flavour] if isinstance(flavour, str) else flavour
    if find_compiler(flavour) is None:
        raise KernelBuildError(f"{flavour.compiler()!r} compiler not found; install it or set "
                               f"{flavour.compiler_env}")
    key = build_key(flavour)
    lib = library_path(flavour, key)
    if lib.is_file() and not force:
        return lib
    fd = _lock(lib.parent.with_suffix(".lock"), LOCK_TIMEOUT_S)
    try:
        if lib.is_file() and not force:  # built by another process while we waited
            return lib
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkstemp(dir=lib.parent, prefix=lib.name + ".", suffix=".tmp")[1])
        cmd = [*shlex.split(flavour.compiler()), *flavour.flags, "-I", str(CSRC), "-o", str(tmp),
               *(str(CSRC / s) for s in flavour.sources), "-lm"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LOCK_TIMEOUT_S)
            if proc.returncode != 0:
                (lib.parent / "build.log").write_text(" ".join(cmd) + "\n" + proc.stderr)
                first = next((ln for ln in proc.stderr.splitlines() if "error" in ln),
                             proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "")
                raise KernelBuildError(f"building the {flavour.name} kernels failed: "
                                       f"{first.strip()[:200]} (full log: "
                                       f"{lib.parent / 'build.log'})")
            (lib.parent / "build.log").write_text(" ".join(cmd) + "\n" + proc.stderr)
            os.replace(tmp, lib)
        finally:
            tmp.unlink(missing_ok=True)
        return lib
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
