"""The ``torch`` layer kernels: gptlab.nn's own PyTorch formulas behind the
:class:`~gptlab.core.layer_kernels.LayerKernels` interface (the teaching reference, and what the
``native`` kernels are checked against). A model built on them computes exactly what its modules
compute with no layer kernels at all."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F

from gptlab.core.layer_kernels import LayerKernels
from gptlab.nn.norms import layer_norm


class TorchKernels(LayerKernels):
    name = "torch"
    priority = 10
    description = "hand-written PyTorch (the reference): LayerNorm in 7 ops, F.gelu, " \
                  "F.cross_entropy"

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
        return layer_norm(x, weight, bias, eps)

    def linear_gelu(self, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        return F.gelu(linear(x))

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)
