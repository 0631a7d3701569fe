"""The benchmark section: forward and forward+backward of each attention backend and dtype
against sdpa in the same dtype, as median time, TFLOP/s and peak memory."""

from __future__ import annotations

from collections.abc import Callable

import attrs

from gptlab.core.errors import first_line
from gptlab.verify.gpucheck.options import Options
from gptlab.verify.gpucheck.report import Progress, Section, table
from gptlab.verify.gpucheck.targets import Target, dtype_name
from gptlab.verify.gpucheck.timing import (Timing, cuda_event_timer, cuda_peak_mib, median_time,
                                           perf_counter_timer)

COLUMNS = ["backend", "dtype", "D", "causal", "fwd ms", "fwd TFLOP/s", "fwd x sdpa",
           "fwd+bwd ms", "fwd+bwd TFLOP/s", "fwd+bwd x sdpa", "peak MiB", "peak x sdpa"]


def attention_flops(B: int, H: int, Tq: int, Tk: int, D: int, *, causal: bool,
                    backward: bool = False) -> float:
    """FLOPs of attention as FlashAttention-2 counts them: 4·B·H·Tq·Tk·D for the forward (two
    matrix products of 2·Tq·Tk·D each), halved when causal; forward+backward is 3.5 times the
    forward (the backward's five products: 2.5 times)."""
    flops = 4.0 * B * H * Tq * Tk * D
    if causal:
        flops /= 2
    return flops * 3.5 if backward else flops


@attrs.frozen
class Measurement:
    """One backend at one shape: its times, FLOPs and peak memory (None off a GPU)."""

    fwd: Timing
    fwd_bwd: Timing
    fwd_flops: float
    fwd_bwd_flops: float
    peak_mib: float | None

    def cells(self, base: Measurement | None) -> list[str]:
        """The table's cells after the label: times, TFLOP/s and ratios to ``base`` (sdpa)."""
        def ratio(a, b):
            return f"{a / b:.2f}" if b else "-"

        return [f"{self.fwd.median_s * 1e3:.2f}",
                f"{self.fwd_flops / self.fwd.median_s / 1e12:.3g}",
                ratio(self.fwd.median_s, base and base.fwd.median_s),
                f"{self.fwd_bwd.median_s * 1e3:.2f}",
                f"{self.fwd_bwd_flops / self.fwd_bwd.median_s / 1e12:.3g}",
                ratio(self.fwd_bwd.median_s, base and base.fwd_bwd.median_s),
                "n/a" if self.peak_mib is None else f"{self.peak_mib:.1f}",
                ratio(self.peak_mib, base and base.peak_mib) if self.peak_mib is not None
                else "-"]


def measure_attention(attn, *, B: int, H: int, T: int, D: int, causal: bool, dtype, device: str,
                      reps: int, warmup: int, timer: Callable[[Callable], float],
                      peak: Callable[[Callable], float] | None = None) -> Measurement:
    """Forward (no grad) and forward+backward median times of ``attn`` on (B, H, T, D) inputs,
    and the forward+backward's peak memory where ``peak`` measures it."""
    import torch

    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, T, D, generator=gen).to(device=device, dtype=dtype)
                     for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def forward():
        with torch.no_grad():
            attn(q, k, v, causal=causal)

    def forward_backward():
        attn(q, k, v, causal=causal).backward(dout)
        q.grad = k.grad = v.grad = None

    fwd = median_time(forward, timer=timer, reps=reps, warmup=warmup)
    fwd_bwd = median_time(forward_backward, timer=timer, reps=reps, warmup=warmup)
    mib = peak(forward_backward) if peak else None
    return Measurement(fwd, fwd_bwd, attention_flops(B, H, T, T, D, causal=causal),
                       attention_flops(B, H, T, T, D, causal=causal, backward=True), mib)


def run(s: Section, t: Target, o: Options, progress: Progress) -> None:
    """One table row per backend, dtype, head dim and causal-or-not, sdpa first; a row that
    raises is an error row and fails the section."""
    import torch

    cuda = t.device == "cuda"
    timer = cuda_event_timer if cuda else perf_counter_timer
    peak = cuda_peak_mib if cuda else None
    s.add(f"B={o.B} H={o.H} T={o.T}, median of {o.reps} after {o.warmup} warm-up, "
          f"{'CUDA events' if cuda else 'wall time (CPU)'}; FLOPs 4·B·H·T²·D forward, "
          f"halved when causal, forward+backward 3.5x; 'x sdpa' is time over sdpa's in the "
          f"same dtype; peak MiB is the forward+backward's rise of max_memory_allocated.")
    s.add()
    rows = []
    dtypes = sorted({d for cls in t.attention for d in cls.dtypes},
                    key=lambda d: (d != torch.float32, dtype_name(d)))
    for dtype in dtypes:
        for D in o.head_dims:
            for causal in (True, False):
                req = t.attention_request(dtype, D=D, T=o.T, causal=causal)
                base = None
                for cls in (t.baseline, *[c for c in t.attention if dtype in c.dtypes]):
                    label = [f"`{cls.name}`", dtype_name(dtype), D, "yes" if causal else "no"]
                    reasons = cls.not_supported_reasons(req)
                    if reasons:
                        rows.append(label + [f"unsupported: {'; '.join(reasons)}"] + [""] * 7)
                        continue
                    progress(f"benchmark: {cls.name} {dtype_name(dtype)} D={D} causal={causal}")
                    try:
                        m = measure_attention(cls(), B=o.B, H=o.H, T=o.T, D=D, causal=causal,
                                              dtype=dtype, device=t.device, reps=o.reps,
                                              warmup=o.warmup, timer=timer, peak=peak)
                    except Exception as e:  # out of memory, a launch error: this row only
                        s.failed = True
                        rows.append(label + [f"error: {type(e).__name__}: "
                                             f"{first_line(e, 150)}"] + [""] * 7)
                        if cuda:
                            torch.cuda.empty_cache()
                        continue
                    base = base or (m if cls is t.baseline else None)
                    rows.append(label + m.cells(base))
    s.lines += table(COLUMNS, rows)
    if s.failed:
        s.add()
        s.add("- FAIL: a benchmark row raised (see 'error' above)")
