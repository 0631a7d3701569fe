"""Where gptlab keeps files on the user's machine: one place for every cache and data folder.

- ``cache_dir()``: ``$XDG_CACHE_HOME/gptlab`` (default ``~/.cache/gptlab``): downloaded corpora;
- ``kernel_cache_dir()``: ``$GPTLAB_KERNEL_CACHE`` or ``<cache_dir>/kernels``: compiled kernels;
- ``data_dir()``: ``$GPTLAB_DATA_DIR`` if set: a folder holding corpora (CI's shared copy).

Torch-free, so that anything may import it.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "GPTLAB_DATA_DIR"
KERNEL_CACHE_ENV = "GPTLAB_KERNEL_CACHE"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gptlab"


def kernel_cache_dir() -> Path:
    env = os.environ.get(KERNEL_CACHE_ENV)
    return Path(env).expanduser() if env else cache_dir() / "kernels"


def data_dir() -> Path | None:
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else None
