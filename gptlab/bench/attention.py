"""Attention benchmark (``gpt bench attention``): forward+backward median time and peak extra
memory per backend and sequence length, against ``sdpa`` measured in the same run.

Each (backend, T) point runs in a fresh subprocess (``python -m gptlab.bench.attention``) so
that memory left cached by an earlier point cannot hide this one's peak. On the CPU, peak extra
memory is the rise of the process's resident high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) over the first forward+backward of that size (after a warm-up on a
tiny one), so it counts tensors torch allocates (outputs, gradients, saved activations) and the
kernels' own scratch alike; on CUDA it is the rise of ``torch.cuda.max_memory_allocated`` (every
buffer of gptlab's kernels comes from torch's allocator). Times are the median of ``reps``
forward+backward runs (on CUDA, bracketed by ``synchronize``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import attrs

SEQ_LENS = (64, 256, 1024, 2048)


@attrs.frozen
class BenchPoint:
    backend: str
    B: int
    H: int
    T: int
    D: int
    time_ms: float | None = None  # median forward+backward
    peak_extra_mib: float | None = None
    error: str | None = None
    device: str = "cpu"
    dtype: str = "float32"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def measure(backend: str, B: int, H: int, T: int, D: int, reps: int,
            device: str = "cpu", dtype: str = "float32") -> BenchPoint:
    """Measure one point in this process (called in a subprocess by :func:`run`)."""
    import torch

    from gptlab.core.attention import AttentionRequest
    from gptlab.core.devices import resolve_device
    from gptlab.core.selection import select
    from gptlab.core.plugins import load_registry

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    reg = load_registry()
    dt = getattr(torch, dtype)
    req = AttentionRequest(device=dev.type, dtype=dt, head_dim=D, q_len=T, k_len=T)
    attn = select(reg, "attention_backends", backend, req)()
    gen = torch.Generator().manual_seed(0)

    def inputs(t):
        return [torch.randn(B, H, t, D, generator=gen).to(dev, dt).requires_grad_()
                for _ in range(3)]

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def step(q, k, v, dout):
        out = attn(q, k, v, causal=True)
        out.backward(dout)
        q.grad = k.grad = v.grad = None

    # warm up on a tiny problem (library load, lazy init) so that the measured step is the
    # first one of this size: memory freed by a full-size warm-up would hide its peak
    step(*inputs(8), torch.randn(B, H, 8, D).to(dev, dt))
    q, k, v = inputs(T)
    dout = torch.randn(B, H, T, D, generator=gen).to(dev, dt)
    peak = None
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        step(q, k, v, dout)
        sync()
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            base = _status_kib("VmRSS")
            step(q, k, v, dout)
            peak = (_status_kib("VmHWM") - base) / 1024
        except OSError:
            pass
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        step(q, k, v, dout)
        sync()
        times.append(time.perf_counter() - t0)
    return BenchPoint(backend, B, H, T, D, statistics.median(times) * 1e3, peak,
                      device=dev.type, dtype=dtype)


def run(backends, seq_lens=SEQ_LENS, *, B=8, H=4, D=32, reps=None, device="cpu",
        dtype="float32", on_point=None) -> list[BenchPoint]:
    """Measure every backend at every T, each point in a subprocess; ``reps`` None: 5, or 3
    for T >= 2048. ``on_point(point)`` is called as each point is measured."""
    points = []
    for T in seq_lens:
        for name in backends:
            n = reps or (3 if T >= 2048 else 5)
            cmd = [sys.executable, "-m", "gptlab.bench.attention", device, dtype, name, str(B),
                   str(H), str(T), str(D), str(n)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if proc.returncode == 0:
                point = BenchPoint(**json.loads(proc.stdout.strip().splitlines()[-1]))
            else:
                err = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                point = BenchPoint(name, B, H, T, D, error=err[:200], device=device,
                                   dtype=dtype)
            points.append(point)
            if on_point:
                on_point(point)
    return points


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    device, dtype, name, *nums = sys.argv[1:]
    print(json.dumps(attrs.asdict(measure(name, *map(int, nums), device=device, dtype=dtype))))
