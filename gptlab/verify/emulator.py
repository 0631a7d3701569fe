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
"""

from __future__ import annotations

import contextlib
import os
import re

from gptlab.core.errors import ConfigError

SCHEDULE_ENV = "GPTLAB_EMU_SCHEDULE"
MUTATE_ENV = "GPTLAB_EMU_MUTATE"
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
