"""The Linear layer, computed through the model's matrix products (``--matmul``).

:class:`Linear` is ``nn.Linear`` (same parameters, init and state dict) whose forward asks the
:class:`~gptlab.core.matmuls.Matmul` it was built with for ``x W^T + b``; without one it is
``F.linear``. :class:`TorchMatmul` is that reference as an implementation: torch's own product
(MKL on x86 CPUs, cuBLAS on GPUs).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F

from gptlab.core.matmuls import Matmul


class TorchMatmul(Matmul):
    name = "torch"
    priority = 10
    description = "F.linear: torch's own product (MKL on x86 CPUs, cuBLAS on GPUs)"

    def linear(self, x, weight, bias):
        return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear(in_features, out_features, bias)`` computed by ``matmul`` (None: F.linear)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 matmul: Matmul | None = None):
        super().__init__(in_features, out_features, bias=bias)
        self.matmul = matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self.matmul is None:
            return F.linear(x, self.weight, self.bias)
        return self.matmul.linear(x, self.weight, self.bias)


def product(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``x W^T`` of ``linear`` without its bias (for a kernel that adds the bias itself),
    through its matmul if it has one."""
    matmul = getattr(linear, "matmul", None)
    return F.linear(x, linear.weight) if matmul is None else matmul.linear(x, linear.weight, None)
