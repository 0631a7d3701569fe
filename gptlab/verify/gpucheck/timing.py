"""Timing harness of the benchmark: the median of timed runs after a warm-up, with a wall-clock
timer (CPU tensors) or CUDA events (GPU), and the peak CUDA memory of one step."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import attrs


@attrs.frozen
class Timing:
    """The median of the timed runs, and every sample."""

    median_s: float
    samples: tuple[float, ...]


def median_time(step: Callable[[], object], *, timer: Callable[[Callable], float],
                reps: int = 10, warmup: int = 3) -> Timing:
    """Run ``step`` ``warmup`` times untimed, then ``reps`` times through ``timer`` (which runs
    the step it is given once and returns its seconds); the median of those."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got {reps}, {warmup}")
    for _ in range(warmup):
        step()
    samples = tuple(float(timer(step)) for _ in range(reps))
    return Timing(statistics.median(samples), samples)


def perf_counter_timer(step: Callable[[], object]) -> float:
    """Wall time of one call (for CPU tensors, whose kernels finish before they return)."""
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def cuda_event_timer(step: Callable[[], object]) -> float:
    """GPU time of one call between two CUDA events on the current stream."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def cuda_peak_mib(step: Callable[[], object]) -> float:
    """Rise of ``torch.cuda.max_memory_allocated`` over the memory allocated before ``step``."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
