"""Writing files so that a crash, a kill or a full disk never leaves a half-written one.

Every file gptlab writes that a user relies on (checkpoints, the metrics log, the downloaded
corpus, the kernel libraries and their build logs) goes through :func:`atomic_path`: the data is
written to a temporary file in the same folder, flushed to disk (``fsync``) and renamed over the
target, so the target is always either the old file or the complete new one. Torch-free.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, fsync it and rename it
    over ``path``. On any exception (Ctrl-C included) the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike,
                 data: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Write ``data`` (bytes, UTF-8 text, or a function writing to a binary file) atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode() if isinstance(data, str) else data)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
