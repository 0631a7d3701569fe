"""Matrix products: which library computes the Linear layers' ``y = x W^T + b`` and its gradients.

Two thirds or more of a CPU training step are these products, and the same sgemm runs at very
different speeds through different libraries on one CPU: torch's CPU builds compute float32
``F.linear`` with MKL, which dispatches on the CPU's vendor (on an AMD EPYC with AVX-512 it
runs a generic path), while oneDNN, also inside torch, dispatches on the instruction set. So the
matrix products are an implementation chosen like attention backends and layer kernels
(``--matmul``): an :class:`~gptlab.core.selection.Implementation` registered through the
``register_matmuls`` hook, with a ``linear(x, weight, bias)`` that :class:`gptlab.nn.Linear`
computes through. ``torch`` (``F.linear``, the reference) and ``onednn`` are built in.

``--matmul auto`` times every candidate on the run's Linear shapes (forward and backward, in
interleaved rounds, :func:`measured_choice`) and remembers the answer per machine, torch, gptlab
and shape in :mod:`gptlab.core.autotune`'s cache; a candidate must beat the highest-priority one
by :data:`gptlab.core.autotune.MARGIN`. ``GPTLAB_AUTO=priority``: the highest priority.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import attrs
import torch

from gptlab.core import autotune
from gptlab.core.selection import Implementation, Request

#: The measurement's rows are the run's tokens per batch, cut to this many.
MAX_ROWS = 4096


@attrs.frozen(kw_only=True)
class MatmulRequest(Request):
    """What a model will ask of its matrix products: the device, and the dtype of the
    activations (the autocast dtype, if any)."""


class Matmul(Implementation):
    """An implementation of the Linear layers' products; subclasses set the capability
    constants and implement :meth:`linear`, differentiable in x, weight and bias."""

    name = "base"
    devices = frozenset({"cpu", "cuda"})
    dtypes = frozenset({torch.float32, torch.bfloat16, torch.float16})

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
               ) -> torch.Tensor:
        """``x @ weight.T + bias`` for x (..., in), weight (out, in), bias (out,) or None."""
        raise NotImplementedError


@attrs.frozen
class Shapes:
    """The Linear layers a model will run: ``rows`` tokens per call, ``(in, out)`` widths."""

    rows: int
    widths: tuple[tuple[int, int], ...]

    @classmethod
    def of_transformer(cls, batch: int, block_size: int, n_embd: int) -> Shapes:
        """GPT-2's block: the q/k/v projection, the output projection, the MLP's two."""
        C = n_embd
        return cls(min(batch * block_size, MAX_ROWS), ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)))


def time_matmul(cls: type[Matmul], request: MatmulRequest, shapes: Shapes
                ) -> Callable[[], float]:
    """A function that runs ``shapes``' Linear layers forward and backward through ``cls`` and
    returns the seconds."""
    device = torch.device(request.device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    layers = []
    for n_in, n_out in shapes.widths:
        x = torch.randn(shapes.rows, n_in, generator=gen).to(device, request.dtype)
        w = (0.02 * torch.randn(n_out, n_in, generator=gen)).to(device).requires_grad_()
        b = torch.zeros(n_out, device=device, requires_grad=True)
        dy = torch.randn(shapes.rows, n_out, generator=gen).to(device, request.dtype)
        layers.append((x.requires_grad_(), w, b, dy))
    impl = cls()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once() -> float:
        sync()
        start = time.perf_counter()
        for x, w, b, dy in layers:
            impl.linear(x, w, b).backward(dy)
            x.grad = w.grad = b.grad = None
        sync()
        return time.perf_counter() - start

    return once


def measured_choice(candidates: Sequence[type[Matmul]], request: MatmulRequest,
                    shapes: Shapes) -> type[Matmul]:
    """The fastest of ``candidates`` (highest priority first) on ``shapes``, remembered in the
    kernel cache folder for this machine, torch, gptlab and shape."""
    if len(candidates) < 2:
        return candidates[0]
    tags = ",".join(f"{c.name}{c.measure_tag(request)}" for c in candidates)
    where = f"{request.describe()} | rows {shapes.rows}, widths {shapes.widths}"
    return autotune.remembered_fastest(
        candidates, f"matmul | {autotune.key_prefix(request.device)} | {tags} | {where}",
        lambda: autotune.fastest(candidates, request, None,
                                 timer=lambda c: time_matmul(c, request, shapes)),
        f"matmul {where}")
