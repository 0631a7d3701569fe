"""Layer-kernels benchmark (``gpt bench ops``): forward+backward time of each registered layer
kernels' LayerNorm, linear + GELU and cross-entropy against the PyTorch code they replace.

What is timed, at a model's sizes (rows = B * T), for each op:

- ``layer_norm``: ``F.layer_norm(x, (C,), w, b, 1e-5)`` (the reference) and each layer kernels'
  ``layer_norm(x, w, b, 1e-5)``, x of (B, T, C); ``torch``'s is the hand-written LayerNorm of
  :mod:`gptlab.nn.norms`, ``native``'s the one-pass C/CUDA kernel.
- ``linear_gelu``: ``F.gelu(linear(x))`` (the reference) and each layer kernels'
  ``linear_gelu(x, linear)``, for ``linear = nn.Linear(C, 4C)``. Every row includes the matrix
  product (``native`` leaves it to torch and fuses only the bias and the GELU), so the gap
  between rows is the bias + GELU part; ``linear(x)`` alone is timed too, as the floor.
- ``cross_entropy``: ``F.cross_entropy(logits, targets)`` (the reference) and each layer
  kernels' ``cross_entropy(logits, targets)``, logits of (B * T, V).

A step is the forward, then the backward into every input that takes a gradient (x, the
weights and biases, the logits), their gradients reset after it; the inputs are made once per
op. Each round runs every implementation of an op once, in turn (interleaved, so that a change
in the machine's load hits all of them alike); the time is the median over rounds. The layer
kernels are those registered (``--kernels`` names) that run on the device in float32.
"""

from __future__ import annotations

import statistics
import time

import attrs

#: The layer kernels' operations, each timed against the PyTorch code it replaces.
OPS = ("layer_norm", "linear_gelu", "cross_entropy")


@attrs.frozen
class OpTiming:
    op: str
    impl: str
    baseline: bool  # the PyTorch reference the op's ratios are taken against
    time_ms: float  # median forward+backward over interleaved rounds


def layer_kernels(reg, device: str) -> tuple[dict, list[tuple[str, list[str]]]]:
    """``({name: prepared LayerKernels}, [(name, reasons)])``: the registered layer kernels that
    run on ``device`` in float32 (highest priority first), and those that do not, with why."""
    import torch

    from gptlab.core.selection import candidates, select
    from gptlab.core.errors import GptlabError
    from gptlab.core.layer_kernels import KernelRequest

    request = KernelRequest(device=torch.device(device).type, dtype=torch.float32)
    ready, skipped = {}, []
    for cls, reasons in candidates(reg, "layer_kernels", request):
        if not reasons:
            try:
                ready[cls.name] = select(reg, "layer_kernels", cls.name, request)()
                continue
            except GptlabError as e:  # its kernels failed to build
                reasons = [str(e).splitlines()[0]]
        skipped.append((cls.name, reasons))
    return ready, skipped


def _impls(op: str, kernels: dict, B: int, T: int, C: int, V: int, device):
    """[(name, is_baseline, step)] for one op: the PyTorch reference first, then each layer
    kernels' (and for linear_gelu the product alone)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device).requires_grad_()

    def grad(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    def stepper(fn, leaves, dout=None):
        def step():
            fn().backward(dout)
            for t in leaves:
                t.grad = None
        return step

    def each(call, leaves, dout=None):
        return [(f"--kernels {k}", False, stepper(lambda lk=lk: call(lk), leaves, dout))
                for k, lk in kernels.items()]

    if op == "layer_norm":
        x, w, b, dy = leaf(B, T, C), leaf(C), leaf(C), grad(B, T, C)
        return [("F.layer_norm", True,
                 stepper(lambda: F.layer_norm(x, (C,), w, b, 1e-5), [x, w, b], dy)),
                *each(lambda lk: lk.layer_norm(x, w, b, 1e-5), [x, w, b], dy)]
    if op == "linear_gelu":
        x, dy = leaf(B, T, C), grad(B, T, 4 * C)
        linear = nn.Linear(C, 4 * C).to(device)
        with torch.no_grad():  # from the op's generator, like every other input
            linear.weight.copy_(grad(4 * C, C) * C ** -0.5)
            linear.bias.copy_(grad(4 * C))
        leaves = [x, *linear.parameters()]
        return [("F.gelu(linear(x))", True, stepper(lambda: F.gelu(linear(x)), leaves, dy)),
                *each(lambda lk: lk.linear_gelu(x, linear), leaves, dy),
                ("linear(x) alone", False, stepper(lambda: linear(x), leaves, dy))]
    if op == "cross_entropy":
        logits = leaf(B * T, V, scale=2.0)
        targets = torch.randint(0, V, (B * T,), generator=gen).to(device)
        return [("F.cross_entropy", True,
                 stepper(lambda: F.cross_entropy(logits, targets), [logits])),
                *each(lambda lk: lk.cross_entropy(logits, targets), [logits])]
    raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")


def run(kernels: dict, op_names=OPS, *, B=32, T=128, C=192, V=111, rounds=30, warmup=3,
        device="cpu", clock="wall") -> list[OpTiming]:
    """Forward+backward time of each op's reference and of each of ``kernels`` (from
    :func:`layer_kernels`), at a model's sizes: LayerNorm over C, linear + GELU from C to 4 * C,
    cross-entropy over V, on B * T rows.

    ``clock="cpu"`` times the process's CPU time (all its threads) instead of wall time: on a
    machine shared with other work, wall time counts the time other processes ran, and torch's
    OpenMP threads, which spin while they wait, suffer most from it; CPU time does not."""
    import torch

    dev = torch.device(device)
    now = time.process_time if clock == "cpu" else time.perf_counter

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    out = []
    for op in op_names:
        impls = _impls(op, kernels, B, T, C, V, dev)
        for _, _, step in impls:
            for _ in range(warmup):
                step()
        times = [[] for _ in impls]
        for _ in range(rounds):
            for i, (_, _, step) in enumerate(impls):
                sync()
                t0 = now()
                step()
                sync()
                times[i].append(now() - t0)
        out += [OpTiming(op, name, base, statistics.median(ts) * 1e3)
                for (name, base, _), ts in zip(impls, times)]
    return out
