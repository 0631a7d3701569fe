"""Reusing freed host memory between training steps, on Linux with glibc.

A CPU training step allocates and frees the same activations every step (the default model's
MLP activations are 12 MB each). glibc's ``malloc`` serves blocks that large with fresh ``mmap``
pages, or returns the top of its heap to the kernel when they are freed, so the next step
faults the same memory in again: hundreds to thousands of page faults a step on the default
model (measured over 30 steps: 100 to 2,500), where the same memory kept in the heap takes
about one. :func:`keep_freed_memory` sets glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD``
(``mallopt(3)``), as a caching allocator would: blocks up to :data:`MMAP_THRESHOLD` come from
the heap and freed memory stays there for the next step (the process's peak memory is
unchanged; it is not handed back until the process ends). In ``gpt bench train`` it bought
3-4% of a float32 step.

It is process-wide, so the trainer sets it when it trains on the CPU, once; ``GPTLAB_MALLOPT=0``
(or :data:`ENABLED` set to False, as ``gpt bench train``'s ``~keep-freed-memory`` does) leaves
malloc as it is. Elsewhere (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

ENV = "GPTLAB_MALLOPT"
#: Blocks up to this size come from the heap, not from mmap.
MMAP_THRESHOLD = 256 << 20
#: Free memory at the top of the heap is returned to the kernel only beyond this.
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>

#: False: leave malloc as it is.
ENABLED = os.environ.get(ENV, "1").strip() != "0"
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse (once per process); whether it is
    set (False: not glibc, or turned off)."""
    global _done
    if _done is None:
        _done = ENABLED and _mallopt()
    return _done


def _mallopt() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.info("mallopt refused the thresholds: malloc left as it is")
    return ok
