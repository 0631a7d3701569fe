"""Mixed precision: the autocast context of a run's forward passes, and ``--dtype auto``.

``--dtype bfloat16`` or ``float16`` runs the forward passes under ``torch.autocast``
(Micikevicius et al. 2018, "Mixed Precision Training"): matrix products in the low precision;
weights, gradients and optimizer state in float32. Whether that is faster is the hardware's
answer, not a rule: on a CPU without bfloat16 instructions (AVX-512 BF16, AMX) torch converts
every bfloat16 product through float32 and a step is several times slower; on one with them,
and on GPUs of compute capability 8.0 and later, it is faster.

``--dtype auto`` (the default) therefore measures where bfloat16 can pay: a few forward and
backward passes of the run's own model on a batch of its shape, in float32 and in bfloat16,
interleaved, and takes bfloat16 if it needs at most :data:`MARGIN` of float32's time. The
answer is remembered per device model, torch, gptlab, model shape and kernels (in
:mod:`gptlab.core.autotune`'s cache), so a machine measures once. Where bfloat16 cannot pay (no
instructions for it, a GPU before compute capability 8.0) nothing is measured: float32. A named
dtype always wins; a resumed run keeps the dtype its checkpoint records; ``GPTLAB_AUTO=priority``
turns measuring off (float32).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable

import attrs
import torch

from gptlab.core import autotune

log = logging.getLogger(__name__)

AUTO = "auto"
#: bfloat16 must take at most this fraction of float32's time to be chosen.
MARGIN = 0.9
ROUNDS = 5


@attrs.frozen
class Choice:
    """The dtype a run trains in, and why (``auto: 1.42x float32 here``)."""

    dtype: str
    reason: str


def autocast(device: torch.device, dtype: str):
    """The context of a forward pass in ``dtype`` (none for float32)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def bfloat16_unavailable_reason(device: torch.device) -> str | None:
    """Why bfloat16 cannot be faster than float32 on ``device`` (None: it may be)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"compute capability {major}.{minor} < 8.0 has no bfloat16 tensor cores"
        return None
    if device.type == "cpu":
        if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
            return "this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX)"
        return None
    return f"not measured on {device.type}"


def time_passes(models: dict[str, torch.nn.Module], idx: torch.Tensor,
                device: torch.device, rounds: int = ROUNDS) -> dict[str, float]:
    """Median seconds of one forward+backward pass of each ``models[dtype]`` on ``idx`` (as
    input and target) under that dtype's autocast, after a warm-up, in interleaved rounds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once(dtype: str, model: torch.nn.Module) -> float:
        sync()
        start = time.perf_counter()
        with autocast(device, dtype):
            _, loss = model(idx, idx)
        loss.backward()
        sync()
        seconds = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return seconds

    for dtype, model in models.items():
        once(dtype, model)  # warm-up: allocations, lazy initialisation, kernel loading
    times = {dtype: [] for dtype in models}
    for _ in range(rounds):
        for dtype, model in models.items():
            times[dtype].append(once(dtype, model))
    return {dtype: statistics.median(ts) for dtype, ts in times.items()}


def without_measuring(device: torch.device, measure: bool = True) -> Choice | None:
    """``--dtype auto``'s choice where nothing is to be measured (float32, and why), or None."""
    if not measure:
        return Choice("float32", "auto: not measured (GPTLAB_AUTO=priority)")
    why_not = bfloat16_unavailable_reason(device)
    return Choice("float32", f"auto: {why_not}") if why_not else None


def choose(build: Callable[[str], torch.nn.Module], device: torch.device, batch: int,
           block_size: int, vocab_size: int, tag: str) -> Choice:
    """``--dtype auto`` by measurement, for a run whose model ``build(dtype)`` makes (on
    ``device``, with the attention backend and kernels that dtype would get), on batches of
    ``batch`` x ``block_size`` tokens. ``tag`` says what else decides the speed (the model's
    shape and parts): the measurement is remembered under the device's model, torch, gptlab
    and it."""
    key = f"dtype | {autotune.key_prefix(device.type)} | {tag} | batch {batch} x {block_size}"
    entry = autotune.remembered(key)
    if entry is None:
        gen = torch.Generator().manual_seed(0)
        idx = torch.randint(0, vocab_size, (batch, block_size), generator=gen).to(device)
        seconds = time_passes({d: build(d).train() for d in ("float32", "bfloat16")}, idx,
                              device)
        faster = seconds["bfloat16"] <= MARGIN * seconds["float32"]
        entry = {"choice": "bfloat16" if faster else "float32",
                 "ms": {d: round(t * 1e3, 2) for d, t in seconds.items()}}
        log.info("dtype auto measured %s: %s", key, entry)
        autotune.remember(key, entry)
    speedup = entry["ms"]["float32"] / entry["ms"]["bfloat16"]
    return Choice(entry["choice"], f"auto: bfloat16 {speedup:.2f}x float32 here")
