"""One gpucheck run: the chosen sections in order against one target, into one report."""

from __future__ import annotations

import contextlib
import datetime
import functools
from pathlib import Path

from gptlab.verify.gpucheck import (benchmark, conformance, devices, environment, faults,
                                    graphs, layouts, sanitizer, streams)
from gptlab.verify.gpucheck.calls import synchronised
from gptlab.verify.gpucheck.options import SECTIONS, Options
from gptlab.verify.gpucheck.report import Progress, Report, Section, run_section, slug
from gptlab.verify.gpucheck.targets import Target

DEFAULT_RESULTS = Path("benchmarks") / "results"
#: Each section's function: (section, target, options, progress) -> None.
STEPS = {"environment": environment.run, "conformance": conformance.run,
         "layouts": layouts.run, "streams": streams.run, "graphs": graphs.run,
         "devices": devices.run, "faults": faults.run, "sanitizer": sanitizer.run,
         "benchmark": benchmark.run}
#: Sections whose kernels run unsynchronised: synchronising after each launch would be timed.
UNSYNCHRONISED = ("benchmark",)


class GpuCheck:
    """The sections of :class:`Options` against one :class:`Target`; :meth:`run` returns the
    :class:`Report`."""

    def __init__(self, target: Target, options: Options = Options(),
                 progress: Progress = lambda _: None):
        self.target, self.opts, self.progress = target, options, progress

    def run(self, command: str = "gpt kernels gpucheck") -> Report:
        report = Report(title(self.target), header=[
            f"`{command}`, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
            + (" -- **emulated**: the .cu kernels run on the CPU by the CUDA emulator; times "
               "and the GPU limits below are not a GPU's" if self.target.emulated else "")])
        chosen = [s for s in SECTIONS if s in self.opts.sections]
        for i, name in enumerate(chosen, 1):
            step = functools.partial(self.section, name)
            report.sections.append(run_section(
                name, step, lambda m, i=i: self.progress(f"[{i}/{len(chosen)}] {m}")))
        return report

    def section(self, name: str, s: Section) -> None:
        """Fill section ``s`` by the step called ``name`` (one of :data:`SECTIONS`); but for
        the benchmark, with GPTLAB_CUDA_SYNC=1, so that a fault names the op whose kernel it
        was."""
        sync = contextlib.nullcontext() if name in UNSYNCHRONISED else synchronised()
        with sync:
            STEPS[name](s, self.target, self.opts, self.progress)


def title(target: Target) -> str:
    if target.emulated:
        return "gpucheck: emulated CUDA kernels on the CPU"
    if target.device != "cuda":
        return f"gpucheck: kernels on {target.device}"
    import torch

    return f"gpucheck: {torch.cuda.get_device_name()}"


def default_out(target: Target) -> Path:
    """benchmarks/results/gpucheck-<gpu>.md (gpucheck-emulated.md for the emulated target)."""
    if target.emulated:
        return DEFAULT_RESULTS / "gpucheck-emulated.md"
    import torch

    return DEFAULT_RESULTS / f"gpucheck-{slug(torch.cuda.get_device_name())}.md"
