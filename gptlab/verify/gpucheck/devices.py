"""The devices section: every kernel call on tensors of GPU 1 while GPU 0 is torch's current
device, from a process where nothing has made GPU 0's CUDA context.

The calls must run on GPU 1, leave torch's current device at 0, and create no primary context on
GPU 0 (a few hundred MB: the device guard restores the caller's device only where its context
exists, as torch's guards do); their results must equal the same calls' on GPU 0, run
afterwards. On a GPU it needs two (``python -m gptlab.verify.gpucheck.devices``, a fresh process:
:mod:`.probe`); with one it is skipped. Emulated: the same on the emulator's model of a machine
with two fake GPUs (every tensor placed on GPU 1), in this process.
"""

from __future__ import annotations

import ctypes
import sys

from gptlab.verify.gpucheck.calls import call_line, calls, mismatch, raised
from gptlab.verify.gpucheck.options import Options
from gptlab.verify.gpucheck.probe import report, run_probe
from gptlab.verify.gpucheck.report import Progress, Section
from gptlab.verify.gpucheck.targets import Target


def run(s: Section, t: Target, o: Options, progress: Progress) -> None:
    progress("devices: cuda:1 while cuda:0 is current")
    if t.emulated:
        _emulated(s, t)
        return
    import torch

    if torch.cuda.device_count() < 2:
        s.add(f"- skip: {torch.cuda.device_count()} GPU visible; this check needs two (a "
              f"cuda:1 tensor while cuda:0 is current)")
        return
    run_probe(s, __name__)


def _emulated(s: Section, t: Target) -> None:
    from gptlab.plugins.cuda_kernels.build import CUDA_EMU
    from gptlab.verify import emulator

    s.add("Emulated: two fake GPUs, every tensor on GPU 1, device 0 current with no context; "
          "then the same calls on GPU 0:")
    s.add()
    machine = emulator.Machine(CUDA_EMU.name)
    try:
        for call in calls(t):
            machine.configure(("9.0", "9.0"))
            machine.place(None, 1)
            try:
                got = call.run(*call.prepare("cpu"))
                ran_on, context0 = machine.last_launch_device(), machine.has_context(0)
                machine.configure(("9.0", "9.0"))
                want = call.run(*call.prepare("cpu"))
            except Exception as e:
                call_line(s, call.label, raised(e))
                continue
            bad = mismatch(got, want) or (
                f"its kernels ran on GPU {ran_on}" if ran_on != 1 else
                "GPU 0's context was created" if context0 else None)
            call_line(s, call.label, bad, "ran on GPU 1, no context on GPU 0, results as on "
                                          "GPU 0")
    finally:
        machine.configure()


def primary_context(device: int) -> bool | None:
    """Whether GPU ``device``'s primary context exists (the driver's
    cuDevicePrimaryCtxGetState); None where the driver cannot say."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    handle, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
    if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(handle), device):
        return None
    if cuda.cuDevicePrimaryCtxGetState(handle, ctypes.byref(flags), ctypes.byref(active)):
        return None
    return bool(active.value)


def probe() -> list[str]:
    """The check on a GPU (this process must not have touched GPU 0)."""
    import torch

    from gptlab.core.plugins import load_registry
    from gptlab.verify.gpucheck.targets import cuda_target

    if torch.cuda.device_count() < 2:
        return [f"skip: {torch.cuda.device_count()} GPU visible; needs two"]
    target, lines = cuda_target(load_registry()), []
    a = torch.randn(64, 64, device="cuda:1")  # torch's own start on GPU 1, ours not yet
    (a @ a).sum().item()
    before = primary_context(0)
    results = {}
    for call in calls(target):
        try:
            results[call.label] = [x.cpu() for x in call.run(*call.prepare("cuda:1"))]
        except Exception as e:
            lines.append(f"FAIL {call.label} on cuda:1: {raised(e, 160)}")
    after, current = primary_context(0), torch.cuda.current_device()
    if before:
        lines.append("skip: torch made GPU 0's context before any gptlab kernel ran; whether "
                     "the kernels make it cannot be told here")
    elif after:
        lines.append("FAIL GPU 0's primary context was created by the calls on cuda:1")
    else:
        lines.append(f"pass no primary context on GPU 0 after every call on cuda:1 (driver "
                     f"{'says none' if after is False else 'cannot say'})")
    lines.append(("pass" if current == 0 else "FAIL") + f" torch's current device after the "
                 f"calls: {current} (was 0)")
    for call in calls(target):
        if call.label not in results:
            continue
        try:
            bad = mismatch(results[call.label], call.run(*call.prepare("cuda:0")))
        except Exception as e:
            bad = f"{raised(e, 160)} on cuda:0"
        lines.append(f"FAIL {call.label}: {bad}" if bad
                     else f"pass {call.label}: results on cuda:1 as on cuda:0")
    return lines


def main() -> int:
    from gptlab.verify.gpucheck.targets import require_gpu

    require_gpu()
    return report(probe())


if __name__ == "__main__":
    sys.exit(main())
