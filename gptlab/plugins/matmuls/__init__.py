"""Built-in matrix products (``--matmul``): ``torch`` (``F.linear``, :class:`gptlab.nn.TorchMatmul`)
and ``onednn``: float32 Linear layers on the CPU through oneDNN, the library inside torch that
computes its bfloat16 products.

torch's float32 ``F.linear`` on the CPU is MKL's sgemm, which picks its code by the CPU's vendor:
on an AMD EPYC with AVX-512 it ran the default model's forward and input-gradient products
1.2-1.4x slower than oneDNN, which picks its code by instruction set
(``benchmarks/results/matmul.md``). ``onednn`` computes the forward
``x W^T + b`` (bias in the same call) and the input gradient ``dy W`` with oneDNN, and the
weight gradient ``dy^T x`` with torch's ``mm`` (oneDNN was slower there: it copies the
transposed operands). Products of fewer than :data:`MIN_ROWS` rows (decoding one token per
sequence) stay torch's: oneDNN's fixed cost per call made them 1.5-3x slower there. ``--matmul
auto`` measures both on the run's shapes (:mod:`gptlab.core.matmuls`), so a CPU where MKL is
faster keeps ``torch``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from gptlab import hookimpl
from gptlab.core.matmuls import Matmul
from gptlab.nn.linear import TorchMatmul

#: Fewer rows than this go through F.linear (measured: oneDNN pays from 64-256 rows at C = 192).
MIN_ROWS = 128


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's ``x @ weight.T + bias`` for x (N, in), weight (out, in) (any strides)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@torch.library.custom_op("gptlab::onednn_linear", mutates_args=())
def onednn_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                     ) -> torch.Tensor:
    """The product as a registered op, which ``torch.compile`` calls as it is (its lowering of
    oneDNN's linear expects weights it packed itself)."""
    return _product(x, weight, bias)


@onednn_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _gradients(product):
    def backward(ctx, dy):  # dy (N, out)
        x, weight = ctx.saved_tensors
        dy = dy.contiguous()
        dx = product(dy, weight.t(), None) if ctx.needs_input_grad[0] else None  # (N, in)
        dw = dy.t().mm(x) if ctx.needs_input_grad[1] else None  # (out, in)
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db
    return backward


onednn_linear_op.register_autograd(_gradients(onednn_linear_op), setup_context=_setup)


class _OneDNNLinear(torch.autograd.Function):
    """The eager path: the same product and gradients, without the dispatcher."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        y = _product(x, weight, bias)
        _setup(ctx, (x, weight, bias), y)
        return y

    backward = staticmethod(_gradients(_product))


class OneDNNMatmul(Matmul):
    name = "onednn"
    priority = 20
    description = "float32 Linear layers through torch's oneDNN (CPU): picks its code by " \
                  "instruction set, not by vendor"
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.float32})

    @classmethod
    def unavailable_reasons(cls, device: str) -> list[str]:
        if not torch.backends.mkldnn.is_available():
            return ["this torch was built without oneDNN (mkldnn)"]
        try:
            torch.ops.mkldnn._linear_pointwise
        except (AttributeError, RuntimeError):
            return [f"torch {torch.__version__} has no oneDNN linear op "
                    f"(torch.ops.mkldnn._linear_pointwise)"]
        return []

    def linear(self, x, weight, bias):
        if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
                or torch.is_autocast_enabled("cpu") or x.numel() < MIN_ROWS * x.shape[-1]
                or x.shape[-1] != weight.shape[-1]):
            # autocast's products, another device's, a few rows, or torch's error for shapes
            # that differ
            return F.linear(x, weight, bias)
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (N, in)
        if torch.compiler.is_compiling():
            y = onednn_linear_op(x2, weight, bias)
        elif torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                          or (bias is not None and bias.requires_grad)):
            y = _OneDNNLinear.apply(x2, weight, bias)
        else:
            y = _product(x2, weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])  # (..., out)


@hookimpl
def register_matmuls():
    return [TorchMatmul, OneDNNMatmul]
