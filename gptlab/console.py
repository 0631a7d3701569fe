"""What the ``gpt`` commands show while they work: training progress, the download bar, tables.

CLI-side only (the library never prints). On a terminal, progress is a live bar on stderr;
elsewhere (a log file, a pipe) it is a line every tenth of the run.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence

import click

from gptlab.core.errors import printable

Close = Callable[[], None]


def echo_text(text: str, nl: bool = True) -> None:
    """Print generated text as it is; on a terminal, a control character other than newline
    and tab is shown escaped (a checkpoint's vocabulary is untrusted: it could send escape
    codes)."""
    if sys.stdout.isatty():
        text = printable(text, keep="\n\t")
    click.echo(text, nl=nl)


def fmt_time(seconds: float) -> str:
    """``1m05s``, or ``4.2s`` under a minute."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


class TrainingProgress:
    """Shows a run's training events (:class:`~gptlab.core.trainer.TrainEvent`): progress in
    steps of ``max_iters``, or with a time ``budget`` (seconds of steps), in seconds of it."""

    def __init__(self, max_iters: int, budget: float = 0.0, tty: bool | None = None):
        self.max_iters, self.budget = max_iters, budget
        self.loss = self.val = None
        self.tokens_per_s = 0.0
        self.seconds_shown = 0  # of the budget, on the bar
        self.next_line = 0.0  # train_time of the next line, with a budget
        self.every = max(1, max_iters // 10)  # steps between lines, without one
        self.bar = None
        if sys.stderr.isatty() if tty is None else tty:
            length = max(1, int(budget)) if budget > 0 else max_iters
            self.bar = click.progressbar(length=length, label="training", file=sys.stderr,
                                         width=24, show_pos=budget <= 0, show_eta=True,
                                         item_show_func=lambda _: self.status())
            self.bar.__enter__()

    def status(self) -> str:
        if self.loss is None:
            return ""
        speed = f"{self.tokens_per_s:,.0f}" if self.tokens_per_s else "-"  # none measured yet
        s = f"loss {self.loss:.3f}  {speed} tok/s"
        return s + (f"  val {self.val:.3f}" if self.val is not None else "")

    def __call__(self, ev) -> None:
        if ev.kind != "step":
            self.val = ev.val_loss
            if self.bar is None:
                click.echo(f"{self._step(ev)}  eval: train {ev.train_loss:.4f}  "
                           f"val {ev.val_loss:.4f}", err=True)
            return
        self.loss, self.tokens_per_s = ev.loss, ev.tokens_per_s
        if self.bar is not None:
            self.bar.update(self._advance(ev), current_item=ev.step)
        elif ev.step == 1 or self._due(ev):
            click.echo(f"{self._step(ev)}  {self.status()}  [{self._clock(ev)}]", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)

    # steps or seconds ------------------------------------------------------------------------
    def _step(self, ev) -> str:
        return f"step {ev.step:>6}" + ("" if self.budget > 0 else f"/{self.max_iters}")

    def _advance(self, ev) -> int:
        if self.budget <= 0:
            return 1
        now = min(self.bar.length, int(ev.train_time))
        done, self.seconds_shown = now - self.seconds_shown, now
        return done

    def _due(self, ev) -> bool:
        if self.budget <= 0:
            return ev.step % self.every == 0
        return ev.train_time >= self.next_line

    def _clock(self, ev) -> str:
        if self.budget <= 0:
            return fmt_time(ev.elapsed)
        self.next_line = ev.train_time + self.budget / 10
        return (f"{fmt_time(ev.train_time)} of {fmt_time(self.budget)} of steps, "
                f"{fmt_time(ev.elapsed)} in all")


def download_progress() -> tuple[Callable[[int, int], None], Close]:
    """``(progress(done, total), close)`` for the first download of War and Peace."""
    bars = {}

    def progress(done, total):
        if "bar" not in bars:
            bars["bar"] = click.progressbar(length=total or 3_300_000,
                                            label="downloading War and Peace", file=sys.stderr)
            bars["bar"].__enter__()
            bars["done"] = 0
        bars["bar"].update(done - bars["done"])
        bars["done"] = done

    def close():
        if "bar" in bars:
            bars["bar"].__exit__(None, None, None)

    return progress, close


class Table:
    """Fixed-width columns: ``columns`` are ``(title, spec)`` with a format spec per column
    (``"<10"``, ``">11.2f"``); a cell given as a string takes only the spec's alignment and
    width."""

    def __init__(self, columns: Sequence[tuple[str, str]]):
        self.columns = list(columns)

    @staticmethod
    def _width(spec: str) -> str:
        return re.match(r"[<>^]?\d*", spec).group()

    def header(self) -> str:
        return "".join(f"{title:{self._width(spec)}}" for title, spec in self.columns)

    def row(self, *cells) -> str:
        """The first ``len(cells)`` columns of a row."""
        return "".join(f"{c:{self._width(spec) if isinstance(c, str) else spec}}"
                       for c, (_, spec) in zip(cells, self.columns))
