"""The layouts section: every kernel call on inputs at a storage offset of one element (two bytes
in bfloat16: not 16-byte aligned, which the tensor-core kernels' cp.async needs) whose rows have
an odd stride, against the same call on contiguous inputs. The ops must copy or read such views
right, on a GPU as on the emulator."""

from __future__ import annotations

import math

from gptlab.verify.gpucheck.calls import call_line, calls, mismatch, raised
from gptlab.verify.gpucheck.options import Options
from gptlab.verify.gpucheck.report import Progress, Section
from gptlab.verify.gpucheck.targets import Target


def awkward(t):
    """A tensor equal to ``t`` at storage offset 1 whose rows (last dim) have an odd stride:
    the last dim padded by one in a larger buffer."""
    if t.dim() == 0:
        return t
    *lead, n = t.shape
    rows = math.prod(lead)
    buf = t.new_empty(1 + rows * (n + 1))
    view = buf[1:].view(*lead, n + 1)[..., :n]
    view.copy_(t)
    return view


def run(s: Section, t: Target, o: Options, progress: Progress) -> None:
    s.add("Each call (forward and backward) on inputs at storage offset 1 with rows of odd "
          "stride (bfloat16 and float16: not 16-byte aligned), against the same call on "
          "contiguous inputs:")
    s.add()
    for call in calls(t):
        progress(f"layouts: {call.label}")
        try:
            want = call.run(*call.prepare(t.device))
            got = call.run(*call.prepare(t.device, awkward))
        except Exception as e:  # a launch error, a refused view: this call only
            call_line(s, call.label, raised(e))
            continue
        call_line(s, call.label, mismatch(got, want))
