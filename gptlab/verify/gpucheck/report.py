"""The report of a gpucheck run: sections that fail soft, rendered as one markdown file."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import attrs

from gptlab.core.errors import first_line

#: Where progress lines go (the command: stderr).
Progress = Callable[[str], object]


@attrs.define
class Section:
    """One section of the report: its markdown lines, whether a check in it failed, its time."""

    title: str
    lines: list[str] = attrs.Factory(list)
    failed: bool = False
    seconds: float = 0.0

    def add(self, line: str = "") -> None:
        self.lines.append(line)

    def fail(self, line: str) -> None:
        self.failed = True
        self.lines.append(line)


def run_section(title: str, fn: Callable[[Section], object],
                progress: Progress = lambda _: None) -> Section:
    """Run one section; an exception becomes one ``**error**`` line and a failed section."""
    section = Section(title)
    progress(f"{title}: starting")
    start = time.perf_counter()
    try:
        fn(section)
    except Exception as e:  # soft: the next section runs (KeyboardInterrupt still stops)
        section.fail(f"**error** ({type(e).__name__}): {first_line(e, 300)}")
    section.seconds = time.perf_counter() - start
    progress(f"{title}: {'FAILED' if section.failed else 'ok'} ({section.seconds:.1f}s)")
    return section


@attrs.define
class Report:
    """A title, header lines, a pass/fail table of the sections, then each section."""

    title: str
    header: list[str] = attrs.Factory(list)
    sections: list[Section] = attrs.Factory(list)

    @property
    def failed(self) -> list[str]:
        return [s.title for s in self.sections if s.failed]

    def markdown(self) -> str:
        out = [f"# {self.title}", "", *self.header, "", "| section | result | time |",
               "|---|---|---|"]
        out += [f"| {s.title} | {'FAIL' if s.failed else 'pass'} | {s.seconds:.1f} s |"
                for s in self.sections]
        for s in self.sections:
            out += ["", f"## {s.title}", "", *s.lines]
        return "\n".join(out).rstrip() + "\n"


def table(header: list[str], rows: list[list[object]]) -> list[str]:
    """A markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"
