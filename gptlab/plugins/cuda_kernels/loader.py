"""Load a native kernel library with cffi (ABI mode) and call it with error checking.

The cffi ``cdef`` and the ABI version come from :mod:`.abi` (the C header is the single
definition of the ABI). Every flavour (CPU, CUDA, emulated CUDA) is loaded by the same
:class:`NativeLibrary`, from a path that :func:`.build.build` or :func:`.build.cached_library`
verified (size and sha256) just before; a library that lacks a function of the ABI or has another
ABI version is a :class:`KernelError`, and so is a non-zero return code (carrying
``gptlab_last_error()``).
"""

from __future__ import annotations

import threading
from pathlib import Path

import cffi
import torch

from gptlab.core.errors import GptlabError
from gptlab.plugins.cuda_kernels import build
from gptlab.plugins.cuda_kernels.abi import ABI_VERSION, cdef_source


#: Set (not "0"), the CUDA library synchronises the stream after each launch and reports a fault
#: inside a kernel from the op whose kernel it was; otherwise a fault shows in a later call,
#: often torch's (csrc/cuda/common.cuh, check_launch). Read at every launch; slower.
SYNC_ENV = "GPTLAB_CUDA_SYNC"


class KernelError(GptlabError):
    """A native kernel returned an error code."""


class NativeLibrary:
    """One loaded flavour of the kernel library."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.ffi = cffi.FFI()
        self.ffi.cdef(cdef_source())
        try:
            self.lib = self.ffi.dlopen(str(self.path))
        except OSError as e:
            raise KernelError(f"cannot load {self.path}: {e}") from None
        for name in dir(self.lib):  # resolve every function of the cdef now, not at first call
            try:
                getattr(self.lib, name)
            except AttributeError:
                raise KernelError(f"{self.path} lacks {name}(): it is not a gptlab kernel "
                                  f"library; rebuild it with `gpt kernels build --force`") from None
        version = self.lib.gptlab_abi_version()
        if version != ABI_VERSION:
            raise KernelError(f"{self.path} has ABI version {version}, expected {ABI_VERSION}; "
                              f"rebuild with `gpt kernels build --force`")
        self.flavour = self.ffi.string(self.lib.gptlab_flavour()).decode()

    def ptr(self, t: torch.Tensor | None, ctype: str = "float *"):
        return self.ffi.NULL if t is None else self.ffi.cast(ctype, t.data_ptr())

    def last_error(self) -> str:
        return self.ffi.string(self.lib.gptlab_last_error()).decode(errors="replace")

    def cuda_device_count(self) -> tuple[int, str | None]:
        """(GPUs this library can launch on, why none if the runtime failed)."""
        count = self.ffi.new("int *")
        rc = self.lib.gptlab_cuda_device_count(count)
        return count[0], (self.last_error() if rc else None)

    def call(self, name: str, *args) -> int:
        rc = getattr(self.lib, name)(*args)
        if rc != 0:
            raise KernelError(f"{name} failed (code {rc}): {self.last_error()}")
        return rc


_loaded: dict = {}  # Flavour -> NativeLibrary
_lock = threading.Lock()


def load(flavour="cpu") -> NativeLibrary:
    """Build (if needed) and load a flavour (a name or a ``build.Flavour``) once per process."""
    flavour = build.get_flavour(flavour)
    with _lock:
        if flavour not in _loaded:
            _loaded[flavour] = NativeLibrary(build.build(flavour))
        return _loaded[flavour]
