"""Transformer building blocks written out by hand: LayerNorm and the feed-forward MLP.

LayerNorm follows Ba, Kiros & Hinton 2016 ("Layer Normalization"): normalise each position's
feature vector to zero mean and unit (biased) variance, then scale and shift. The MLP is the
position-wise feed-forward network of Vaswani et al. 2017, with GELU (Hendrycks & Gimpel 2016)
as in GPT-2.
"""

import torch
import torch.nn as nn
from torch.nn import functional as F

from gptlab.core.interfaces import FeedForward, Norm


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dim, written out."""
    # (torch.var_mean is one call but measured 2x slower than this on the CPU)
    mean = x.mean(dim=-1, keepdim=True)  # (B, T, 1)
    xc = x - mean
    var = (xc * xc).mean(dim=-1, keepdim=True)  # biased variance, as in the paper
    y = xc * torch.rsqrt(var + eps)
    if bias is None:
        return y * weight
    return torch.addcmul(bias, y, weight)  # bias + y * weight, one op


class LayerNorm(Norm):
    """``y = (x - mean) / sqrt(var + eps) * weight + bias`` over the last dimension.

    Computed by :func:`layer_norm`, or by the layer kernels installed with
    :func:`gptlab.core.layer_kernels.set_layer_kernels` (e.g. the C kernel: one pass per row).
    """

    name = "layernorm"
    description = "LayerNorm (Ba et al. 2016): centre, scale to unit variance, affine (GPT-2)"

    def __init__(self, ndim: int, bias: bool = True, eps: float = 1e-5):
        super().__init__(ndim, bias, eps)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.kernels = None  # a LayerKernels, or None: the formula above

    def forward(self, x):
        if self.kernels is not None:
            return self.kernels.layer_norm(x, self.weight, self.bias, self.eps)
        return layer_norm(x, self.weight, self.bias, self.eps)


class MLP(FeedForward):
    """Position-wise feed-forward: Linear(C, 4C) -> GELU -> Linear(4C, C) -> dropout.

    ``c_proj`` writes into the residual stream, so GPT-2's init scales it (:mod:`gptlab.nn.init`).
    """

    name = "gelu"
    description = "Linear(C, 4C) -> GELU -> Linear(4C, C)  (GPT-2)"

    def __init__(self, config):
        super().__init__(config)
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.kernels = None  # a LayerKernels (e.g. a fused bias + GELU), or None: F.gelu

    def forward(self, x):
        h = F.gelu(self.c_fc(x)) if self.kernels is None else self.kernels.linear_gelu(x, self.c_fc)
        y = self.c_proj(h)  # (B, T, C)
        return self.dropout(y) if self.training else y
