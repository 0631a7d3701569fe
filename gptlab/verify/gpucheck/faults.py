"""The faults section: a fault inside a kernel is reported by the op whose kernel it was under
``GPTLAB_CUDA_SYNC=1``, and only later without it (as the emulator cannot show by itself).

On a GPU, two fresh processes (:mod:`.probe`; a fault is sticky, the process cannot go on) each
launch the LayerNorm kernel on an input pointer no allocation holds (address 256), so that the
kernel reads an illegal address: with GPTLAB_CUDA_SYNC=1 the op must raise, naming
``layernorm_forward``; without it the op returns and the next synchronisation raises. ``python -m
gptlab.verify.gpucheck.faults sync|async`` is such a process. Emulated: the same, in this process,
with the emulator's injected fault and GPU-like asynchronous reporting (``GPTLAB_EMU_FAULT``,
``GPTLAB_EMU_ASYNC``).
"""

from __future__ import annotations

import sys

from gptlab.core.errors import first_line
from gptlab.verify.gpucheck.calls import synchronised
from gptlab.verify.gpucheck.options import Options
from gptlab.verify.gpucheck.probe import report, run_probe
from gptlab.verify.gpucheck.report import Progress, Section
from gptlab.verify.gpucheck.targets import Target

OP = "layernorm_forward"


def run(s: Section, t: Target, o: Options, progress: Progress) -> None:
    progress("faults: a kernel reading an illegal address")
    if t.emulated:
        _emulated(s)
        return
    for mode in ("sync", "async"):
        with synchronised(mode == "sync"):
            run_probe(s, __name__, mode)
        s.add()


def _verdicts(raised_in_op: str | None, raised_later: str | None, sync: bool) -> list[str]:
    """The lines for one run: with sync, the op raised naming itself; without, it returned and
    a later call raised."""
    if sync:
        ok = raised_in_op is not None and OP in raised_in_op
        return [f"{'pass' if ok else 'FAIL'} GPTLAB_CUDA_SYNC=1: "
                + (f"the op raised: {raised_in_op}" if raised_in_op else "the op did not raise")]
    ok = raised_in_op is None and raised_later is not None
    return [f"{'pass' if ok else 'FAIL'} without GPTLAB_CUDA_SYNC: "
            + (f"the op raised at once: {raised_in_op}" if raised_in_op
               else f"the op returned; the next call raised: {raised_later}" if raised_later
               else "nothing raised")]


def _emulated(s: Section) -> None:
    import torch

    from gptlab.plugins.cuda_kernels import ops
    from gptlab.plugins.cuda_kernels.build import CUDA_EMU
    from gptlab.verify import emulator

    s.add("Emulated: the LayerNorm kernel made to fault (GPTLAB_EMU_FAULT), faults reported as "
          "a GPU reports them (GPTLAB_EMU_ASYNC):")
    s.add()
    machine = emulator.Machine(CUDA_EMU.name)
    x, w = torch.randn(4, 32), torch.randn(32)
    try:
        for sync in (True, False):
            machine.configure()
            in_op = later = None
            with synchronised(sync), emulator.asynchronous():
                with emulator.fault("layernorm_forward_kernel"):
                    try:
                        ops.layer_norm(x, w, w, 1e-5, CUDA_EMU.name)
                    except Exception as e:
                        in_op = first_line(e, 300)
                if machine.synchronize():
                    later = "cudaDeviceSynchronize: an illegal memory access"
            for line in _verdicts(in_op, later, sync):
                (s.fail if line.startswith("FAIL") else s.add)(f"- {line}")
    finally:
        machine.configure()


def probe(sync: bool) -> list[str]:
    """On the GPU: LayerNorm forward of an input at address 256."""
    import torch

    from gptlab.plugins.cuda_kernels.loader import load

    lib = load("cuda")
    y, w = torch.empty(4, 32, device="cuda"), torch.ones(32, device="cuda")
    mean, rstd = torch.empty(4, device="cuda"), torch.empty(4, device="cuda")
    stream = lib.ffi.cast("void *", torch.cuda.current_stream().cuda_stream)
    bogus = lib.ffi.cast("float *", 256)
    in_op = later = None
    try:
        lib.call("gptlab_layernorm_forward_f32", lib.ptr(y), lib.ptr(mean), lib.ptr(rstd),
                 bogus, lib.ptr(w), lib.ptr(w), 4, 32, 1e-5, stream, 1)
    except Exception as e:
        in_op = first_line(e, 300)
    try:
        torch.cuda.synchronize()
    except Exception as e:
        later = first_line(e, 300)
    return _verdicts(in_op, later, sync)


def main(argv: list[str]) -> int:
    from gptlab.verify.gpucheck.targets import require_gpu

    if argv not in (["sync"], ["async"]):
        sys.exit("usage: python -m gptlab.verify.gpucheck.faults sync|async")
    require_gpu()
    return report(probe(argv == ["sync"]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
