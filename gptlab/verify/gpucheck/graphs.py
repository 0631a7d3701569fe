"""The graphs section: every kernel call captured into a CUDA graph and replayed.

On a GPU, in a fresh process (:mod:`.probe`) so that each kernel's first launch in the process
happens inside the capture (where lazy module loading, the device guard's queries and
GPTLAB_CUDA_SYNC's check run under capture rules): torch's own kernels are warmed up first, not
ours; then each call is captured once and replayed on two new sets of inputs copied into its
static inputs, and each replay must equal the same call run eagerly. ``python -m
gptlab.verify.gpucheck.graphs`` is that process.

Emulated: the emulator reports the ops' stream as being captured while every call runs with
GPTLAB_CUDA_SYNC=1, so a synchronisation inside the capture would fail it (as on a GPU, with
cudaErrorStreamCaptureUnsupported); the results must equal the same call's outside the capture.
Replaying needs a GPU.
"""

from __future__ import annotations

import sys

from gptlab.verify.gpucheck.calls import (Call, call_line, calls, mismatch, raised,
                                          synchronised)
from gptlab.verify.gpucheck.options import Options
from gptlab.verify.gpucheck.probe import report, run_probe
from gptlab.verify.gpucheck.report import Progress, Section
from gptlab.verify.gpucheck.targets import Target


def run(s: Section, t: Target, o: Options, progress: Progress) -> None:
    progress("graphs: capture and replay")
    if t.emulated:
        _emulated(s, t)
    else:
        run_probe(s, __name__)


def _emulated(s: Section, t: Target) -> None:
    from gptlab.plugins.cuda_kernels.build import CUDA_EMU
    from gptlab.verify import emulator

    s.add("Emulated: each call with GPTLAB_CUDA_SYNC=1 while the emulator reports its stream "
          "capturing (no synchronisation may happen), against the same call outside the "
          "capture; replaying needs a GPU:")
    s.add()
    machine = emulator.Machine(CUDA_EMU.name)
    machine.configure()
    with synchronised():
        for call in calls(t):
            try:
                want = call.run(*call.prepare("cpu"))
                machine.capture(0)
                try:
                    got = call.run(*call.prepare("cpu"))
                finally:
                    machine.capture(0, on=False)
            except Exception as e:
                call_line(s, call.label, raised(e))
                continue
            call_line(s, call.label, mismatch(got, want), "captured, no sync")
    machine.configure()


def _scaled(inputs: list, cast: tuple, k: int) -> list:
    """New values for a replay: the float inputs scaled by 1 + k/10."""
    return [x * (1 + k / 10) if c else x for x, c in zip(inputs, cast)]


def _warm_up_torch(call: Call) -> None:
    """torch's own libraries (cuBLAS) initialised outside the capture, as torch advises; none of
    gptlab's kernels is launched."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for dtype in {call.dtype, torch.float32}:
            a = torch.randn(64, 64, device="cuda", dtype=dtype, requires_grad=True)
            (a @ a).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def capture_and_replay(call: Call) -> str:
    """``pass ...`` or ``FAIL ...`` for one call: captured (its first launch), replayed twice."""
    import torch

    try:
        _warm_up_torch(call)
        static = call.prepare("cuda")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = call.run(*static)
        for k in (1, 2):
            fresh = _scaled(call.prepare("cuda"), call.cast, k)
            for dst, src in zip(static, fresh):
                dst.copy_(src)
            graph.replay()
            torch.cuda.synchronize()
            got = [x.clone() for x in outs]
            bad = mismatch(got, call.run(*fresh))
            if bad:
                return f"FAIL {call.label}: replay {k}: {bad}"
    except Exception as e:
        return f"FAIL {call.label}: {raised(e)}"
    return f"pass {call.label}: first launch inside the capture, 2 replays equal eager runs"


def main() -> int:
    from gptlab.core.plugins import load_registry
    from gptlab.verify.gpucheck.targets import cuda_target, require_gpu

    require_gpu()
    return report([capture_and_replay(c) for c in calls(cuda_target(load_registry()))])


if __name__ == "__main__":
    sys.exit(main())
