"""Normalisations, written out: LayerNorm (GPT-2's), RMSNorm and QK-norm; and ``none``.

LayerNorm (Ba, Kiros & Hinton 2016, "Layer Normalization") normalises each position's feature
vector to zero mean and unit (biased) variance, then scales and shifts it.

RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization") drops LayerNorm's
centring and bias: ``y = x / sqrt(mean(x^2) + eps) * weight``. It is cheaper and, in the models
that followed (LLaMA, the nanoGPT speedrun), trains as well.

QK-norm (Henry et al. 2020; Dehghani et al. 2023) RMS-normalises each head's queries and keys
before their dot product, which bounds the attention logits and lets training use a higher
learning rate; here it has no learned weight (as in the modded-nanogpt speedrun).

``none`` (:class:`NoNorm`) leaves normalisation out: every norm of the model is the identity, as
in the transformer rungs of the ladder before LayerNorm (:mod:`gptlab.ladder`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from gptlab.core.interfaces import Norm

if TYPE_CHECKING:
    from gptlab.core.layer_kernels import LayerKernels


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

    Computed by :func:`layer_norm`, or by the model's layer kernels when it is given some
    (``--kernels native``: the C or CUDA kernel, one pass per row).
    """

    name = "layernorm"
    description = "LayerNorm (Ba et al. 2016): centre, scale to unit variance, affine (GPT-2)"
    uses_layer_kernels = True

    def __init__(self, ndim: int, bias: bool = True, eps: float = 1e-5,
                 kernels: LayerKernels | None = None):
        super().__init__(ndim, bias, eps)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.kernels = kernels  # None: the formula above

    def forward(self, x):
        if self.kernels is not None:
            return self.kernels.layer_norm(x, self.weight, self.bias, self.eps)
        return layer_norm(x, self.weight, self.bias, self.eps)


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


class NoNorm(Norm):
    """No normalisation: ``y = x``. Every norm a block builds (and the final norm) is then the
    identity, with no parameters."""

    name = "none"
    description = "no normalisation: the identity (the ladder's rungs before LayerNorm)"

    def __init__(self, ndim: int, bias: bool = True, eps: float = 1e-5):
        super().__init__(ndim, bias, eps)

    def forward(self, x):
        return x


class QKNorm(nn.Module):
    """A position-seam module: ``q, k -> rms_norm(q), rms_norm(k)`` per head (no weight)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, q, k, pos):  # q (B, nh, T, hs), k (B, nh, T, hs)
        return rms_norm(q, None, self.eps), rms_norm(k, None, self.eps)
