"""RMSNorm and QK-norm: normalisations newer than GPT-2's LayerNorm.

RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization") drops LayerNorm's
centring and bias: ``y = x / sqrt(mean(x^2) + eps) * weight``. It is cheaper and, in the
models that followed (LLaMA, the nanoGPT speedrun), trains as well.

QK-norm (Henry et al. 2020; Dehghani et al. 2023) RMS-normalises each head's queries and keys
before their dot product, which bounds the attention logits and lets training use a higher
learning rate; here it has no learned weight (as in the modded-nanogpt speedrun).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gptlab.core.interfaces import Norm


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) (* weight)`` over the last dim, written out."""
    y = x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps)  # (..., C)
    return y if weight is None else y * weight


class RMSNorm(Norm):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dimension (no centring, no
    bias: ``bias`` is accepted for the :class:`~gptlab.core.interfaces.Norm` interface and
    ignored)."""

    name = "rmsnorm"
    description = "RMSNorm (Zhang & Sennrich 2019): scale to unit RMS, then a weight; no bias"

    def __init__(self, ndim: int, bias: bool = True, eps: float = 1e-5):
        super().__init__(ndim, bias, eps)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class QKNorm(nn.Module):
    """A position-seam module: ``q, k -> rms_norm(q), rms_norm(k)`` per head (no weight)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, q, k, pos):  # q (B, nh, T, hs), k (B, nh, T, hs)
        return rms_norm(q, None, self.eps), rms_norm(k, None, self.eps)
