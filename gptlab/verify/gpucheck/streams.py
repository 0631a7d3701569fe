"""The streams section (GPU only): every kernel call on a side stream. The side stream waits
for the default one (``wait_stream``), sleeps on the GPU, then writes the call's inputs into
buffers that held NaN and runs the call; the default stream waits for it before the results are
read. A kernel launched on any stream but torch's current one would run before its inputs are
written (and read NaN): the results must equal the same call's on the default stream."""

from __future__ import annotations

from gptlab.verify.gpucheck.calls import call_line, calls, mismatch, raised
from gptlab.verify.gpucheck.options import Options
from gptlab.verify.gpucheck.report import Progress, Section
from gptlab.verify.gpucheck.targets import Target

#: GPU clock cycles the side stream sleeps before writing the inputs (tens of milliseconds).
SLEEP_CYCLES = 50_000_000


def run(s: Section, t: Target, o: Options, progress: Progress) -> None:
    if t.device != "cuda":
        s.add("- skip (emulated): CPU tensors have no streams; on a GPU each call runs on a "
              "side stream that waits for the default one and writes its own inputs after a "
              "GPU sleep, against the same call on the default stream")
        return
    import torch

    sleep = getattr(torch.cuda, "_sleep", None)
    wait = (f"a GPU sleep of {SLEEP_CYCLES:,} cycles" if sleep
            else "no sleep: this torch has no torch.cuda._sleep")
    s.add(f"Each call on a side stream (inputs written there after {wait}), against the same "
          f"call on the default stream:")
    s.add()
    for call in calls(t):
        progress(f"streams: {call.label}")
        try:
            want = call.run(*call.prepare("cuda"))
            inputs = call.prepare("cuda")
            bufs = [torch.full_like(x, float("nan")) if x.is_floating_point() else x.clone()
                    for x in inputs]
            torch.cuda.synchronize()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                if sleep:
                    sleep(SLEEP_CYCLES)
                for b, x in zip(bufs, inputs):
                    b.copy_(x)
                got = call.run(*bufs)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
        except Exception as e:
            call_line(s, call.label, raised(e))
            continue
        call_line(s, call.label, mismatch(got, want))
