"""Running a check in a fresh Python process (graphs: the kernels' first launch must happen
inside a capture; devices: no CUDA context may exist on GPU 0 beforehand), and reading its
``pass ...`` / ``FAIL ...`` / ``skip ...`` lines into a section."""

from __future__ import annotations

import os
import subprocess
import sys

from gptlab.verify.gpucheck.report import Section

#: How long one probe process may take.
PROBE_TIMEOUT_S = 300.0


def run_probe(s: Section, module: str, *args: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """``python -m module args...``: each of its ``pass``/``FAIL``/``skip`` lines becomes a line
    of the section; a FAIL line, a non-zero exit or a timeout fails it (with the output's
    tail)."""
    cmd = [sys.executable, "-m", module, *args]
    s.add(f"In a fresh process: `{' '.join(['python', *cmd[1:]])}`")
    s.add()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        s.fail(f"- FAIL: timed out after {timeout_s:g} s")
        return
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("pass ", "FAIL ", "skip "))]
    for ln in lines:
        (s.fail if ln.startswith("FAIL ") else s.add)(f"- {ln}")
    if proc.returncode != 0 and not any(ln.startswith("FAIL ") for ln in lines):
        s.fail(f"- FAIL: exit {proc.returncode}")
        s.lines += [f"    - `{ln}`" for ln in (proc.stdout + proc.stderr).strip()
                    .splitlines()[-8:]]


def report(lines: list[str]) -> int:
    """A probe's output (its ``main``): the lines on stdout; exit code 1 if one is a FAIL."""
    for ln in lines:
        print(ln, flush=True)  # noqa: T201 (a script's output)
    return 1 if any(ln.startswith("FAIL ") for ln in lines) else 0
