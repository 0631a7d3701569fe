"""Every kernel of a target as one call, forward and backward, on small inputs: what the layouts,
streams, graphs and devices sections run in their settings and compare with a plain run.

A :class:`Call` makes its inputs on the CPU (float32, seeded), runs on tensors given on any device
and in any layout, and returns its outputs and gradients; :func:`mismatch` compares two runs with
the tolerances of ``torch.testing.assert_close`` for the dtype (dQ is summed with atomics on a
GPU, so two runs may differ in the last bits).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import attrs

from gptlab.core.errors import first_line
from gptlab.verify.gpucheck.targets import Target, dtype_name, dtypes_of


@attrs.frozen
class Call:
    """One kernel call: ``inputs()`` gives float32 CPU tensors, ``run(*tensors)`` (the inputs
    on the target's device, in ``dtype`` where ``cast`` says so) returns its outputs and
    gradients as a list of tensors."""

    label: str
    dtype: object  # torch.dtype
    inputs: Callable[[], list]
    run: Callable[..., list]
    cast: tuple[bool, ...]  # per input: cast to ``dtype`` (False: keep, e.g. int64 targets)

    def prepare(self, device: str, layout: Callable | None = None) -> list:
        """The inputs on ``device`` in their dtypes, each through ``layout`` if given (a
        function of a tensor returning an equal tensor in another layout)."""
        out = []
        for t, cast in zip(self.inputs(), self.cast):
            t = t.to(device, self.dtype) if cast else t.to(device)
            out.append(layout(t) if layout and cast else t)
        return out


def _attention_call(cls, dtype, D: int, T: int) -> Call:
    import torch

    def inputs():
        gen = torch.Generator().manual_seed(D * 1000 + T)
        return [torch.randn(1, 2, T, D, generator=gen) for _ in range(4)]  # q, k, v, dO

    def run(q, k, v, do):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        o = cls()(*leaves, causal=True)
        return [o.detach(), *torch.autograd.grad(o, leaves, do)]

    return Call(f"`{cls.name}` {dtype_name(dtype)} D={D}", dtype, inputs, run,
                (True, True, True, True))


def _layer_call(cls, dtype) -> Call:
    import torch

    rows, C, V = 33, 65, 130

    def inputs():
        gen = torch.Generator().manual_seed(7)
        return [torch.randn(rows, C, generator=gen), torch.randn(C, generator=gen),
                torch.randn(C, generator=gen), torch.randn(2 * C, C, generator=gen) / 8,
                torch.randn(2 * C, generator=gen), torch.randn(rows, V, generator=gen),
                torch.randint(0, V, (rows,), generator=gen)]

    def run(x, w, b, lw, lb, logits, targets):
        kern = cls()
        linear = torch.nn.Linear(C, 2 * C, device=x.device, dtype=x.dtype)
        with torch.no_grad():
            linear.weight.copy_(lw)
            linear.bias.copy_(lb)
        x, w, b, logits = (t.detach().requires_grad_() for t in (x, w, b, logits))
        y = kern.layer_norm(x, w, b, 1e-5)
        h = kern.linear_gelu(x, linear)
        loss = kern.cross_entropy(logits, targets)
        total = y.float().square().mean() + h.float().square().mean() + loss.float()
        grads = torch.autograd.grad(total, [x, w, b, linear.weight, linear.bias, logits])
        return [y.detach(), h.detach(), loss.detach(), *grads]

    return Call(f"layer kernels `{cls.name}` {dtype_name(dtype)}", dtype, inputs, run,
                (True, True, True, True, True, True, False))


def calls(target: Target, *, T: int = 33, head_dims: tuple[int, ...] = (64,)) -> list[Call]:
    """A call per attention backend, dtype it declares and head dim it supports (causal, B=1,
    H=2), and per layer kernels class and dtype (LayerNorm, linear + GELU and the loss at once),
    skipping what cannot run on the target."""
    out = []
    for cls in target.attention:
        for dtype in dtypes_of(cls):
            for D in head_dims:
                if not cls.not_supported_reasons(target.attention_request(dtype, D=D, T=T)):
                    out.append(_attention_call(cls, dtype, D, T))
    for cls in target.layer_kernels:
        for dtype in dtypes_of(cls):
            if not cls.not_supported_reasons(target.kernel_request(dtype)):
                out.append(_layer_call(cls, dtype))
    return out


def mismatch(got: list, want: list) -> str | None:
    """None if each of ``got`` equals ``want``'s within assert_close's tolerances for its dtype
    (NaN never equal), else which output differs and by how much."""
    import torch

    for i, (g, w) in enumerate(zip(got, want)):
        try:
            torch.testing.assert_close(g.cpu(), w.cpu(), equal_nan=False)
        except AssertionError as e:
            detail = next((ln.strip() for ln in str(e).splitlines()
                           if "Greatest absolute difference" in ln), str(e).splitlines()[0])
            return f"output {i} {tuple(g.shape)} differs: {detail}"
    return None


def raised(e: BaseException, limit: int = 300) -> str:
    """What a call raised, on one line: ``(TypeName) message``."""
    return f"({type(e).__name__}) {first_line(e, limit)}"


def call_line(s, label: str, bad: str | None, passed: str = "") -> None:
    """A section's line for one call: ``- FAIL label: bad`` (failing the section), or
    ``- pass label`` with what passed."""
    if bad:
        s.fail(f"- FAIL {label}: {bad}")
    else:
        s.add(f"- pass {label}" + (f": {passed}" if passed else ""))


@contextlib.contextmanager
def synchronised(on: bool = True):
    """Inside the block the CUDA kernels synchronise after each launch (``GPTLAB_CUDA_SYNC=1``),
    so that a fault inside one is reported by its own op (``on`` False: they do not, "0");
    processes started inside inherit it."""
    from gptlab.plugins.cuda_kernels.loader import SYNC_ENV

    old = os.environ.get(SYNC_ENV)
    os.environ[SYNC_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(SYNC_ENV, None)
        else:
            os.environ[SYNC_ENV] = old
