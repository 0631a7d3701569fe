"""A run folder and what it holds: the file names, and the metrics log.

A run folder (``gpt run --out-dir``, default ``out``) holds:

- ``ckpt.pt`` (:data:`CHECKPOINT`): the latest state, what ``--resume`` continues from;
- ``best.pt`` (:data:`BEST`): the state with the lowest val loss so far;
- ``metrics.jsonl`` (:data:`METRICS`): one JSON record per line, written by :class:`MetricsLog`.

Torch-free, so that ``gpt plot`` can read runs without importing torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from gptlab.core.errors import DataError
from gptlab.core.files import atomic_write

CHECKPOINT = "ckpt.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"


class MetricsLog:
    """Append-only JSON-lines log of a run (``metrics.jsonl`` in the run folder).

    Records are dicts with a ``kind`` (``"step"`` or ``"eval"``) and a ``step``. On resume the
    records past the checkpoint's step are dropped, so the log never holds a step twice.
    """

    FILENAME = METRICS

    def __init__(self, out_dir: str | Path | None, resume_step: int | None = None):
        self.path = None if out_dir is None else Path(out_dir) / METRICS
        if self.path is None:
            return
        kept = []
        if resume_step is not None and self.path.exists():  # drop records past the checkpoint
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= resume_step]
        atomic_write(self.path, "".join(ln + "\n" for ln in kept))

    def write(self, **record) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every record of a run folder's ``metrics.jsonl``."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise DataError(f"{run_dir} has no {METRICS}; pass a folder written by `gpt run`")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}:{n} is not valid JSON") from None
    return records
