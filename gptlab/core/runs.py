"""A run folder and what it holds: the file names, and the metrics log.

A run folder (``gpt run --out-dir``, default ``out``) holds:

- ``ckpt.pt`` (:data:`CHECKPOINT`): the latest state, what ``--resume`` continues from;
- ``best.pt`` (:data:`BEST`): the state with the lowest val loss so far;
- ``metrics.jsonl`` (:data:`METRICS`): one JSON record per line, written by :class:`MetricsLog`;
- ``.lock`` (:data:`LOCK`): held (``flock``) by the run writing to the folder, with its pid.

:class:`RunFolder` guards a run's files: a folder that already holds a run is refused unless the
run continues it (``--resume``) or replaces it on purpose (``--overwrite``), and two runs never
write into one folder at once (the second is refused, naming the first's pid; the kernel drops
the lock of a process that dies). Temporary files a killed write left behind are removed.

Torch-free, so that ``gpt plot`` can read runs without importing torch.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
from pathlib import Path

from gptlab.core.errors import DataError, RunFolderError
from gptlab.core.files import TMP_SUFFIX, atomic_write

log = logging.getLogger(__name__)

CHECKPOINT = "ckpt.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
LOCK = ".lock"
RUN_FILES = (CHECKPOINT, BEST, METRICS)


class RunFolder:
    """A run folder held for one run's life (see the module docstring).

    ``resume``: the run continues the one saved here; ``overwrite``: the run replaces it (its
    files are deleted once the folder is held). Release with :meth:`close` (or ``with``).
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool = False,
                 overwrite: bool = False):
        self.path = Path(path)
        self._fd = None
        self._created = not self.path.exists()  # removed again if the run writes nothing
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunFolderError(f"cannot write to the run folder {self.path}: {e.strerror}; "
                                 f"pick another --out-dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise RunFolderError(f"cannot lock the run folder {self.path}: {e.strerror}; "
                                     f"pick another --out-dir") from None
            raise RunFolderError(f"another run (pid {holder}) is writing to {self.path}; wait "
                                 f"for it to finish or pick another --out-dir") from None
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._remove_orphans()
            held = [n for n in RUN_FILES if (self.path / n).exists()]
            if held and not resume:
                if not overwrite:
                    raise RunFolderError(
                        f"{self.path} already holds a run ({', '.join(held)}); continue it with "
                        f"`gpt run --resume {self.path}`, pick another --out-dir, or pass "
                        f"--overwrite to replace it")
                for name in held:
                    (self.path / name).unlink()
        except BaseException:
            self.close()
            raise

    def _remove_orphans(self) -> None:
        """Temporary files of a write that was killed (``ckpt.pt.x1y2.tmp``, ...)."""
        for name in RUN_FILES:
            for tmp in self.path.glob(f"{name}.*{TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the folder; one this run created and left empty (it failed before writing
        anything) is removed, so a typo in an option leaves no debris."""
        if self._fd is None:
            return
        if self._created and {p.name for p in self.path.iterdir()} == {LOCK}:
            (self.path / LOCK).unlink()
            self.path.rmdir()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MetricsLog:
    """Append-only JSON-lines log of a run (``metrics.jsonl`` in the run folder).

    Records are dicts with a ``kind`` (``"step"`` or ``"eval"``) and a ``step``. On resume the
    records past the checkpoint's step are dropped, so the log never holds a step twice, and so
    is a torn last line (what a kill or a full disk leaves). Values must be finite: the log is
    strict JSON (no ``NaN``).
    """

    def __init__(self, out_dir: str | Path | None, resume_step: int | None = None):
        self.path = None if out_dir is None else Path(out_dir) / METRICS
        if self.path is None:
            return
        kept = []
        if resume_step is not None and self.path.exists():  # drop records past the checkpoint
            for record in _records(self.path, skip_bad=True):
                if record.get("step", math.inf) <= resume_step:
                    kept.append(json.dumps(record, allow_nan=False))
        self._guard(lambda: atomic_write(self.path, "".join(ln + "\n" for ln in kept)))

    def write(self, **record) -> None:
        if self.path is not None:
            line = json.dumps(record, allow_nan=False) + "\n"

            def append():
                with open(self.path, "a") as f:
                    f.write(line)

            self._guard(append)

    def _guard(self, fn) -> None:
        try:
            fn()
        except OSError as e:
            raise RunFolderError(f"cannot write {self.path}: {e.strerror}; free some space or "
                                 f"pick another --out-dir") from None


def _records(path: Path, *, skip_bad: bool) -> list[dict]:
    records, lines = [], path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if skip_bad or n == len(lines):  # a torn last line: the write was cut short
                log.info("%s:%d is not valid JSON (a torn write); skipped", path, n)
                continue
            raise DataError(f"{path}:{n} is not valid JSON; remove that line") from None
    return records


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every record of a run folder's ``metrics.jsonl`` (a torn last line is skipped)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise DataError(f"{run_dir} has no {METRICS}; pass a folder written by `gpt run`")
    return _records(path, skip_bad=False)
