"""The sanitizer section: compute-sanitizer's memcheck, racecheck and synccheck, each on the
small-case run of every kernel (:mod:`.smoke`), where compute-sanitizer is on PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from gptlab.core.errors import first_line
from gptlab.verify.gpucheck import smoke
from gptlab.verify.gpucheck.options import Options
from gptlab.verify.gpucheck.report import Progress, Section
from gptlab.verify.gpucheck.targets import Target

TOOLS = ("memcheck", "racecheck", "synccheck")


def run(s: Section, t: Target, o: Options, progress: Progress) -> None:
    """One line per tool (pass, or FAIL with its error summary and first errors); a note and
    no failure where compute-sanitizer is missing."""
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        s.add("- compute-sanitizer is missing (not on PATH): memcheck, racecheck and "
              "synccheck not run")
        return
    args = ["-m", smoke.__name__] + (["--emulate"] if t.emulated else [])
    s.add(f"Each tool runs `{' '.join(['python', *args])}` (every kernel once, small shapes) "
          f"with PYTORCH_NO_CUDA_MEMORY_CACHING=1:")
    s.add()
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "PYTHONUNBUFFERED": "1"}
    for name in TOOLS:
        progress(f"compute-sanitizer --tool {name}")
        cmd = [tool, "--tool", name, "--error-exitcode", "97", sys.executable, *args]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  timeout=o.sanitizer_timeout_s)
        except subprocess.TimeoutExpired:
            s.fail(f"- FAIL {name}: timed out after {o.sanitizer_timeout_s:g} s")
            continue
        out = proc.stdout + proc.stderr
        summary = next((ln.strip("= ").strip() for ln in reversed(out.splitlines())
                        if "ERROR SUMMARY" in ln), None)
        took = f"{time.perf_counter() - start:.1f} s"
        if proc.returncode == 0:
            s.add(f"- pass {name}: {summary or 'no errors'} ({took})")
            continue
        s.fail(f"- FAIL {name} (exit {proc.returncode}): {summary or 'see below'} ({took})")
        errors = [ln.strip("= ").strip() for ln in out.splitlines()  # the tool's own lines
                  if ln.startswith("=========") and "COMPUTE-SANITIZER" not in ln
                  and "ERROR SUMMARY" not in ln and ln.strip("= ")]
        tail = errors[:8] or out.strip().splitlines()[-8:]
        s.lines += [f"    - `{first_line(ln, 200)}`" for ln in tail if ln.strip()]
