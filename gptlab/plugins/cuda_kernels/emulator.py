"""Choosing the CUDA emulator's schedule from Python.

The emulator (``csrc/emu/cuda_emu.h``) reads ``$GPTLAB_EMU_SCHEDULE`` at every launch:
``inorder`` (warps in index order, the default) or ``random`` / ``random:SEED`` (blocks, and the
warps of every scheduling round, in a seeded random order). Kernels whose results depend on the
schedule have a missing barrier; the conformance suite runs under both.
"""

from __future__ import annotations

import contextlib
import os
import re

from gptlab.core.errors import ConfigError

SCHEDULE_ENV = "GPTLAB_EMU_SCHEDULE"
DEFAULT_SCHEDULES = ("inorder", "random:1")
_VALID = re.compile(r"inorder|random(:\d+)?")


def check_schedule(spec: str) -> str:
    if not _VALID.fullmatch(spec):
        raise ConfigError(f"emulator schedule must be inorder, random or random:SEED, "
                          f"got {spec!r}")
    return spec


@contextlib.contextmanager
def schedule(spec: str):
    """Run the emulated kernels launched inside the block under ``spec``."""
    old = os.environ.get(SCHEDULE_ENV)
    os.environ[SCHEDULE_ENV] = check_schedule(spec)
    try:
        yield spec
    finally:
        if old is None:
            os.environ.pop(SCHEDULE_ENV, None)
        else:
            os.environ[SCHEDULE_ENV] = old
