"""Measured dispatch: which of the attention backends that can run a request is fastest here.

Priorities (:attr:`AttentionBackend.priority`) are a guess made on one machine; the same kernel
can win on a CPU with AVX-512 and lose 2-7x on one with AVX2 only. So ``auto``, given the
shape a model will use (:class:`Workload`), times every candidate on that shape (the batch cut
so that T x T score tensors stay small: :func:`measured_batch`), the way the model calls it: q, k, v as the strided views of one ``(B, T, 3, nh, hs)`` projection, forward
and (for training) backward, in interleaved rounds, and takes the fastest by median. A
candidate must beat the highest-priority one by :data:`MARGIN` to displace it, so noise does not
flip the choice. The answer is cached per machine, torch, gptlab and kernel build
(``<kernel cache>/dispatch.json``), so a run measures once and later runs on this machine agree
(a resumed run takes the backend its checkpoint records anyway).

``GPTLAB_AUTO=priority`` turns measurement off (``auto`` = highest priority that runs).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import attrs
import torch

from gptlab.core.attention import AttentionBackend, AttentionRequest
from gptlab.core.files import atomic_write
from gptlab.core.paths import kernel_cache_dir

log = logging.getLogger(__name__)

AUTO_ENV = "GPTLAB_AUTO"
#: A faster candidate must take at most this fraction of the priority choice's time.
MARGIN = 0.95
ROUNDS = 5
CACHE_FILE = "dispatch.json"


@attrs.frozen
class Workload:
    """The shape behind an :class:`AttentionRequest`: batch and heads (the request has the rest)."""

    batch: int
    heads: int


def measuring() -> bool:
    """Whether ``auto`` measures (``$GPTLAB_AUTO`` is not ``priority``)."""
    return os.environ.get(AUTO_ENV, "measure").strip().lower() != "priority"


def machine(device: str) -> str:
    """The device's model (the GPU's name; the CPU's, with the threads torch uses)."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                        name)
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def key_prefix(device: str) -> str:
    """What every remembered measurement is keyed by first: the device's model, torch and
    gptlab (``--attention``, ``--matmul`` and ``--dtype auto`` add their own parts)."""
    from gptlab import __version__

    return f"{machine(device)} | torch {torch.__version__} | gptlab {__version__}"


def cache_key(candidates: Sequence[type[AttentionBackend]], request: AttentionRequest,
              work: Workload) -> str:
    tags = ",".join(f"{c.name}{c.measure_tag(request)}" for c in candidates)
    return (f"{key_prefix(request.device)} | {tags} | B {work.batch}, heads {work.heads}, "
            f"{request.describe()}")


#: Bytes of one (B, nh, T, T) float32 score tensor the measurement may allocate: a backend that
#: materialises scores (naive, fused) holds a few of these, so the measured batch is cut to stay
#: far below any machine's memory (every candidate is timed on the same batch, so the ranking
#: holds), and measuring stays a second or so however long the sequences are.
SCORES_BUDGET = 32 << 20


def measured_batch(work: Workload, request: AttentionRequest) -> int:
    """The batch the candidates are timed on: the run's, cut to :data:`SCORES_BUDGET`."""
    per_sequence = 4 * work.heads * request.q_len * request.k_len
    return max(1, min(work.batch, SCORES_BUDGET // per_sequence))


def time_backend(cls: type[AttentionBackend], request: AttentionRequest, work: Workload
                 ) -> Callable[[], float]:
    """A function that runs one model-shaped call (forward, and backward if the request has
    one) of ``cls`` and returns its seconds."""
    B, nh, T, hs = measured_batch(work, request), work.heads, request.q_len, request.head_dim
    device = torch.device(request.device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(B, T, 3, nh, hs, generator=gen).to(device, request.dtype)
    qkv.requires_grad_(request.requires_grad)
    grad = torch.randn(B, T, nh * hs, generator=gen).to(device, request.dtype)
    backend = cls()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once() -> float:
        sync()
        start = time.perf_counter()
        with torch.set_grad_enabled(request.requires_grad):
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs), as the model
            y = backend(q, k, v, causal=request.causal)  # (B, nh, T, hs)
            y = y.transpose(1, 2).reshape(B, T, nh * hs)
            if request.requires_grad:
                y.backward(grad)
                qkv.grad = None
        sync()
        return time.perf_counter() - start

    return once


def fastest(candidates: Sequence[type[AttentionBackend]], request: AttentionRequest,
            work: Workload, *, rounds: int = ROUNDS,
            timer: Callable[[type[AttentionBackend]], Callable[[], float]] | None = None
            ) -> tuple[type[AttentionBackend], dict[str, float]]:
    """The fastest of ``candidates`` (highest priority first) and each one's median seconds.

    ``timer(cls)`` returns a function that runs one call and returns its seconds (default:
    :func:`time_backend`). A candidate whose call raises is left out (its error logged)."""
    timer = timer or (lambda c: time_backend(c, request, work))
    runs, medians = {}, {}
    for cls in candidates:
        try:
            run = timer(cls)
            run()  # warm-up: first-call costs (allocations, lazy initialisation)
        except Exception as e:
            log.warning("auto: %s left out of the measurement: %s: %s", cls.name,
                        type(e).__name__, e)
            continue
        runs[cls] = run
    if not runs:
        return candidates[0], {}
    times = {cls: [] for cls in runs}
    for _ in range(rounds):  # interleaved, so a machine slowing down slows every candidate
        for cls, run in list(runs.items()):
            try:
                times[cls].append(run())
            except Exception as e:
                log.warning("auto: %s left out of the measurement: %s: %s", cls.name,
                            type(e).__name__, e)
                del runs[cls], times[cls]
    if not runs:
        return candidates[0], {}
    medians = {cls: statistics.median(ts) for cls, ts in times.items()}
    first = next(iter(medians))  # the highest-priority candidate that ran
    best = min(medians, key=medians.get)
    choice = best if medians[best] < MARGIN * medians[first] else first
    return choice, {cls.name: t for cls, t in medians.items()}


def cache_path():
    """Where measured choices are remembered: beside the compiled kernels."""
    return kernel_cache_dir() / CACHE_FILE


def _table() -> dict:
    try:
        table = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def remembered(key: str) -> dict | None:
    """The measurement remembered under ``key`` (a dict with its ``choice``), or None."""
    entry = _table().get(key)
    return entry if isinstance(entry, dict) and "choice" in entry else None


def remember(key: str, entry: dict) -> None:
    """Remember a measurement under ``key`` (a read-only cache costs a re-measurement next
    time, nothing else)."""
    path = cache_path()
    table = _table()
    table[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(table, indent=1, sort_keys=True))
    except OSError as e:
        log.warning("auto: could not record the measurement in %s: %s", path, e)


def measured_choice(candidates: Sequence[type[AttentionBackend]], request: AttentionRequest,
                    work: Workload) -> type[AttentionBackend]:
    """:func:`fastest`, remembered in the kernel cache folder for this machine and request."""
    if len(candidates) < 2:
        return candidates[0]
    return remembered_fastest(candidates, cache_key(candidates, request, work),
                              lambda: fastest(candidates, request, work), request.describe())


def remembered_fastest(candidates: Sequence[type], key: str,
                       measure: Callable[[], tuple[type, dict[str, float]]], what: str) -> type:
    """The choice remembered under ``key`` if it is still one of ``candidates``; else
    ``measure()``'s (``(choice, median seconds by name)``, as :func:`fastest` returns), which is
    remembered unless a candidate failed (out of memory, a busy GPU)."""
    by_name = {c.name: c for c in candidates}
    entry = remembered(key)
    if entry is not None and entry["choice"] in by_name:
        return by_name[entry["choice"]]
    choice, medians = measure()
    if len(medians) < len(candidates):  # one failed: do not remember
        return choice
    log.info("auto measured %s: %s -> %s", what,
             ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in medians.items()), choice.name)
    remember(key, {"choice": choice.name, "ms": {n: round(t * 1e3, 3)
                                                 for n, t in medians.items()}})
    return choice
