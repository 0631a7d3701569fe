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
_UMASK = os.umask(0o022)  # read once (setting it is the only way), then put back
os.umask(_UMASK)


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
        # mkstemp makes 0600: give the file the mode a plain open() would (or the old file's)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_UMASK)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike,
                 data: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Write ``data`` (bytes, UTF-8 text, or a function writing to a binary file) atomically.

    A write the file system refuses (disk full, file too large, read-only) raises that
    ``OSError`` with its errno, even when the writing function (``torch.save`` does) turns it
    into an error of its own."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if not callable(data):
            f.write(data.encode() if isinstance(data, str) else data)
            return path
        writer = _RecordingWriter(f)
        try:
            data(writer)
        except Exception:
            if writer.error is not None:
                raise writer.error from None
            raise
    return path


class _RecordingWriter:
    """A binary file that remembers the first OSError its writes raised."""

    def __init__(self, f: BinaryIO):
        self._f, self.error = f, None

    def write(self, b) -> int:
        try:
            return self._f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def fsync_dir(folder: Path) -> None:
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
