"""Choosing the CUDA emulator's schedule, and removing one barrier or atomic, from Python.

The emulator (``emu/cuda_emu.h``) reads ``$GPTLAB_EMU_SCHEDULE`` at every launch:

- ``inorder`` (the default): blocks one after another; warps in index order advance in lockstep,
  one barrier segment per round, lanes in order;
- ``reverse``: warps, and the lanes of each warp, in reverse order;
- ``greedy``: each warp runs on to its next ``__syncthreads`` before the next warp starts (its
  lanes still meet at ``__syncwarp`` and shuffles);
- ``random`` / ``random:SEED``: blocks, warps and lanes in a seeded random order, every round.

Under every schedule but ``inorder`` up to 4 blocks are resident at once, their rounds
interleaved. Kernels whose results depend on the schedule have a missing barrier.

``$GPTLAB_EMU_MUTATE=FILE:LINE`` (also read at every launch) removes the ``__syncthreads`` or
``__syncwarp`` at that line (``atomicAdd``: a plain read-modify-write), for mutation testing
(:mod:`.mutations`).

The host-side glue (device guard, device count, launch checks) runs against the emulator's model
of the machine: fake devices with compute capabilities, runtime and driver CUDA versions,
primary contexts created as CUDA 12 creates them, memory placed on a device, streams being
captured (:class:`Machine`). ``$GPTLAB_EMU_ASYNC=1`` (:func:`asynchronous`) reports a fault inside
a kernel as a GPU does, as a sticky error at the next call instead of at its launch, and
``$GPTLAB_EMU_FAULT=NAME`` (:func:`fault`) makes the kernels whose name contains NAME fault
(``cudaErrorIllegalAddress``), as a wild pointer would.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re

from gptlab.core.errors import ConfigError

SCHEDULE_ENV = "GPTLAB_EMU_SCHEDULE"
MUTATE_ENV = "GPTLAB_EMU_MUTATE"
ASYNC_ENV = "GPTLAB_EMU_ASYNC"
FAULT_ENV = "GPTLAB_EMU_FAULT"
DEFAULT_SCHEDULES = ("inorder", "random:1")
#: Every kind of schedule, once each (the mutation test runs them all).
ALL_SCHEDULES = ("inorder", "reverse", "greedy", "random:1")
_VALID = re.compile(r"inorder|reverse|greedy|random(:\d+)?")
_SITE = re.compile(r"[^:/]+:[1-9]\d*")


def check_schedule(spec: str) -> str:
    if not _VALID.fullmatch(spec):
        raise ConfigError(f"emulator schedule must be inorder, reverse, greedy, random or "
                          f"random:SEED, got {spec!r}")
    return spec


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield value
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def schedule(spec: str):
    """Run the emulated kernels launched inside the block under ``spec``."""
    return _env(SCHEDULE_ENV, check_schedule(spec))


def mutate(site: str):
    """Inside the block, the emulator skips the barrier (or makes the atomicAdd a plain
    read-modify-write) at ``site``, ``"FILE:LINE"`` with FILE a base name (``flash.cu:149``)."""
    if not _SITE.fullmatch(site):
        raise ConfigError(f"mutation site must be FILE:LINE (e.g. flash.cu:149), got {site!r}")
    return _env(MUTATE_ENV, site)


def asynchronous():
    """Inside the block, a fault inside an emulated kernel is reported as on a GPU: its launch
    succeeds, and the fault is the sticky error of every later launch and synchronisation until
    :meth:`Machine.configure`."""
    return _env(ASYNC_ENV, "1")


def fault(kernel: str):
    """Inside the block, every launch of a kernel whose name contains ``kernel`` (e.g.
    ``layernorm_forward_kernel``) faults with an illegal memory access."""
    if not kernel:
        raise ConfigError("fault needs a kernel name, e.g. layernorm_forward_kernel")
    return _env(FAULT_ENV, kernel)


def cuda_version(text: str) -> int:
    """``"13.1"`` -> 13010, as cudaRuntimeGetVersion and cudaDriverGetVersion count."""
    if not re.fullmatch(r"\d+\.\d", text):
        raise ConfigError(f"CUDA version must be MAJOR.MINOR (e.g. 13.1), got {text!r}")
    major, minor = text.split(".")
    return int(major) * 1000 + int(minor) * 10


class Machine:
    """The emulator's model of the machine in one emulated library (``gl_emu_*`` in
    ``emu/cuda_emu.h``): what the device guard, the device count and the launch checks of the
    ``.cu`` files see. State is per process (the current device per thread, as the runtime's)."""

    def __init__(self, flavour: str = "cuda-emu"):
        from gptlab.plugins.cuda_kernels import loader

        self.path = loader.load(flavour).path  # the library the ops call, loaded once
        lib = ctypes.CDLL(str(self.path))  # the same handle: dlopen counts references
        lib.gl_emu_configure.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        lib.gl_emu_place.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.gl_emu_capture.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self._lib = lib

    def configure(self, devices: tuple[str, ...] = ("9.0",), *, runtime: str | None = None,
                  driver: str | None = None) -> None:
        """Fake GPUs of these compute capabilities, a CUDA runtime and driver of these
        versions (default: the emulator's own, 13.0); no context, placement, capture or sticky
        error, device 0 current."""
        rc = self._lib.gl_emu_configure(",".join(devices).encode(),
                                        cuda_version(runtime) if runtime else 0,
                                        cuda_version(driver) if driver else 0)
        if rc:
            raise ConfigError(f"devices must be compute capabilities such as 9.0, got "
                              f"{devices!r}")

    def place(self, tensor, device: int) -> None:
        """The tensor's memory belongs to fake GPU ``device``; ``tensor`` None: all memory no
        placement names (at first GPU 0's), such as what the ops allocate."""
        storage = None if tensor is None else tensor.untyped_storage()
        if self._lib.gl_emu_place(storage and storage.data_ptr(),
                                  storage.nbytes() if storage else 0, device):
            raise ConfigError(f"no fake GPU {device}")

    def set_device(self, device: int) -> None:
        """cudaSetDevice on this thread (which creates the device's primary context)."""
        if self._lib.gl_emu_set_device(device):
            raise ConfigError(f"no fake GPU {device}")

    def current_device(self) -> int:
        return self._lib.gl_emu_current_device()

    def has_context(self, device: int) -> bool:
        return bool(self._lib.gl_emu_primary_context(device))

    def last_launch_device(self) -> int:
        """The device current at the last launch (-1 before any)."""
        return self._lib.gl_emu_last_launch_device()

    def capture(self, stream: int, on: bool = True) -> None:
        """Mark the stream (a handle, 0 for the legacy one) as being captured into a graph."""
        self._lib.gl_emu_capture(stream or None, int(on))

    def synchronize(self) -> int:
        """cudaDeviceSynchronize: 0, or the sticky error's code."""
        return self._lib.gl_emu_synchronize()
