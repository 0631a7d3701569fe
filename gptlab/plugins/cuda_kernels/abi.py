"""The C ABI of the kernel libraries: the header, its version, and the cffi ``cdef``.

``csrc/gptlab_kernels.h`` is the single definition of the ABI shared by every flavour (CPU, CUDA,
emulated CUDA): outputs first, plain pointers and ints, an ``int`` error code. The cffi ``cdef``
is the part of the header between its ``cffi-begin`` and ``cffi-end`` markers. The build hashes
the version into its cache key and the loader refuses a library of another version.
"""

from __future__ import annotations

import re
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
HEADER = CSRC / "gptlab_kernels.h"
ABI_VERSION = int(re.search(r"#define GPTLAB_ABI_VERSION (\d+)", HEADER.read_text()).group(1))


def cdef_source() -> str:
    """The declarations cffi parses: the header between its ``cffi-begin``/``cffi-end`` marks."""
    text = HEADER.read_text()
    start, end = text.index("/* cffi-begin */"), text.index("/* cffi-end */")
    return text[start + len("/* cffi-begin */"):end]
