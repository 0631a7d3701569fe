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

A new run's files are provisional until its first checkpoint: the run it replaces is moved
aside (into ``.replaced/``, :data:`REPLACED`) only when the new run is about to write, after
every check, and deleted once the new run has written ``ckpt.pt``; a new run that ends before
that (an error, Ctrl-C before training, a full disk, a divergence) removes what it wrote and
puts the replaced run back, so a folder is never left with neither. A run killed in between
(SIGKILL) is put right by the next run that opens the folder.

Torch-free, so that ``gpt plot`` can read runs without importing torch.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path

from gptlab.core.errors import DataError, RunFolderError, command
from gptlab.core.files import TMP_SUFFIX, atomic_write, fsync_dir

log = logging.getLogger(__name__)

CHECKPOINT = "ckpt.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
LOCK = ".lock"
REPLACED = ".replaced"  # the run an --overwrite replaces, until the new run's first checkpoint
RUN_FILES = (CHECKPOINT, BEST, METRICS)


class RunFolder:
    """A run folder held for one run's life (see the module docstring).

    ``resume``: the run continues the one saved here; else it is a new run, whose files are
    provisional until :meth:`commit`. ``overwrite``: the new run may replace the run saved here
    (moved aside by :meth:`begin`, deleted by :meth:`commit`, put back by :meth:`close` if the
    new run never got that far). Release with :meth:`close` (or ``with``).
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool = False,
                 overwrite: bool = False):
        self.path = Path(path)
        self._fd = None
        self._created = not self.path.exists()  # removed again if the run writes nothing
        self._new_run = not resume
        self._replaced: list[str] = []  # what begin() moves aside
        self._begun = self._committed = False
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
            self._settle_replaced()
            held = [n for n in RUN_FILES if (self.path / n).exists()]
            if held and self._new_run:
                if not overwrite:
                    go_on = (f"continue it with `{command('run', '--resume', self.path)}`, "
                             if CHECKPOINT in held else "")
                    raise RunFolderError(
                        f"{self.path} already holds a run ({', '.join(held)}); {go_on}pick "
                        f"another --out-dir, or pass --overwrite to replace it")
                self._replaced = held
        except OSError as e:
            self.close()
            raise RunFolderError(f"cannot use the run folder {self.path}: {e.strerror}; pick "
                                 f"another --out-dir") from None
        except BaseException:
            self.close()
            raise

    def _remove_orphans(self) -> None:
        """Temporary files of a write that was killed (``ckpt.pt.x1y2.tmp``, ...)."""
        for name in RUN_FILES:
            for tmp in self.path.glob(f"{name}.*{TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)

    def _settle_replaced(self) -> None:
        """A run replaced by one that was killed: deleted if the new run wrote its checkpoint,
        else put back."""
        aside = self.path / REPLACED
        if not aside.is_dir():
            return
        if (self.path / CHECKPOINT).exists():
            shutil.rmtree(aside)
        else:
            log.info("%s: putting back the run a killed --overwrite had moved aside", self.path)
            self._put_back()

    def begin(self) -> None:
        """The run is about to write its first file: a run it replaces is moved aside."""
        if self._begun or self._fd is None:
            return
        self._begun = True
        if self._replaced:
            aside = self.path / REPLACED
            try:
                aside.mkdir()
                for name in self._replaced:
                    os.replace(self.path / name, aside / name)
                fsync_dir(self.path)
            except OSError as e:
                self._put_back()
                raise RunFolderError(f"cannot move the run in {self.path} aside: {e.strerror}; "
                                     f"it is unchanged") from None

    def commit(self) -> None:
        """The run has written its first checkpoint: the run it replaced is deleted."""
        if self._committed:
            return
        self._committed = True
        shutil.rmtree(self.path / REPLACED, ignore_errors=True)

    def _put_back(self) -> None:
        """Remove a new run's files and move the run it replaced back."""
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        aside = self.path / REPLACED
        if aside.is_dir():
            for p in aside.iterdir():
                os.replace(p, self.path / p.name)
            aside.rmdir()
        fsync_dir(self.path)

    def close(self) -> None:
        """Release the folder. A new run that never wrote a checkpoint leaves it as it found
        it (its files removed, a run it replaced put back); one this run created and left
        empty is removed, so a typo in an option leaves no debris."""
        if self._fd is None:
            return
        try:
            if self._begun and self._new_run and not self._committed:
                self._put_back()
            if self._created and {p.name for p in self.path.iterdir()} == {LOCK}:
                (self.path / LOCK).unlink()
                self.path.rmdir()
        finally:
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
                step = record.get("step")
                if isinstance(step, int) and not isinstance(step, bool) and step <= resume_step:
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


#: The fields each kind of record must hold, as numbers (``step`` an integer).
RECORD_FIELDS = {"step": ("step", "train_loss"), "eval": ("step", "train_loss", "val_loss")}


def _problem(record) -> str | None:
    """Why a parsed line is not a record ``gpt plot`` and ``--resume`` can use, or None."""
    if not isinstance(record, dict):
        return "is not a JSON object"
    for key in RECORD_FIELDS.get(record.get("kind"), ()):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int if key == "step" else
                                                     (int, float)):
            return f"has no {'integer' if key == 'step' else 'number'} {key!r}"
    return None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not strict JSON")


def _records(path: Path, *, skip_bad: bool) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            problem = None if n == len(lines) else "is not valid JSON"
            record = None
        else:
            problem = _problem(record)
        if problem is None and record is not None:
            records.append(record)
        elif skip_bad or problem is None:  # a torn last line: the write was cut short
            log.info("%s:%d %s; skipped", path, n, problem or "is cut short (a torn write)")
        else:
            raise DataError(f"{path}:{n} {problem}, not a record gptlab wrote; remove that "
                            f"line")
    return records


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every record of a run folder's ``metrics.jsonl`` (a torn last line is skipped)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise DataError(f"{run_dir} has no {METRICS}; pass a folder written by `gpt run`")
    return _records(path, skip_bad=False)
