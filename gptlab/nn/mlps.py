"""Position-wise feed-forward networks (MLPs), written out: GPT-2's GELU MLP, ReLU² and SwiGLU;
and ``none``.

- GELU (Vaswani et al. 2017's feed-forward network with the GELU of Hendrycks & Gimpel 2016,
  as in GPT-2): ``Linear(C, 4C) -> gelu -> Linear(4C, C)``.
- ReLU² (So et al. 2021, "Primer"): ``Linear(C, 4C) -> relu(x)^2 -> Linear(4C, C)``; found by
  architecture search, used by the nanoGPT speedrun.
- SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"): ``(silu(x W1) * (x W3)) W2``. It has
  three matrices instead of two, so its hidden width is 2/3 of 4C (rounded up to a multiple of
  8): the parameter count stays close to the GELU MLP's (PaLM and LLaMA do the same).

- ``none`` (:class:`NoMLP`): the MLP left out. In a residual block it adds nothing
  (``x + 0``); the block without residual connections skips its MLP sub-layer instead
  (:class:`gptlab.nn.PlainBlock`). The ladder's rungs before the MLP use it (:mod:`gptlab.ladder`).

Each is built as ``cls(config)`` (the GELU MLP also takes the model's layer kernels); the last
Linear (into the residual stream) is ``c_proj``, so GPT-2's init scales it
(:mod:`gptlab.nn.init`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn import functional as F

from gptlab.core.interfaces import FeedForward
from gptlab.nn.linear import Linear

if TYPE_CHECKING:
    from gptlab.core.layer_kernels import LayerKernels
    from gptlab.core.matmuls import Matmul


class MLP(FeedForward):
    """Position-wise feed-forward: Linear(C, 4C) -> GELU -> Linear(4C, C) -> dropout.

    The first Linear and the GELU are computed by the model's layer kernels when it is given
    some (``--kernels native``: the bias added and GELU applied in one pass), else by
    ``F.gelu``."""

    name = "gelu"
    description = "Linear(C, 4C) -> GELU -> Linear(4C, C)  (GPT-2)"
    uses_layer_kernels = True
    uses_matmul = True

    def __init__(self, config, kernels: LayerKernels | None = None,
                 matmul: Matmul | None = None):
        super().__init__(config)
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, config.bias, matmul)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, config.bias, matmul)
        self.dropout = nn.Dropout(config.dropout)
        self.kernels = kernels  # None: F.gelu

    def forward(self, x):
        h = F.gelu(self.c_fc(x)) if self.kernels is None else self.kernels.linear_gelu(x, self.c_fc)
        y = self.c_proj(h)  # (B, T, C)
        return self.dropout(y) if self.training else y


class ReLU2MLP(FeedForward):
    name = "relu2"
    description = "Linear(C, 4C) -> relu(x)^2 -> Linear(4C, C)  (Primer, So et al. 2021)"
    uses_matmul = True

    def __init__(self, config, matmul: Matmul | None = None):
        super().__init__(config)
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, config.bias, matmul)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, config.bias, matmul)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = F.relu(self.c_fc(x)).square()  # (B, T, 4C)
        y = self.c_proj(h)
        return self.dropout(y) if self.training else y


def swiglu_hidden(n_embd: int) -> int:
    """Hidden width of SwiGLU for a model width C: 2/3 of 4C, rounded up to a multiple of 8."""
    return -(-8 * n_embd // 3 // 8) * 8


class SwiGLUMLP(FeedForward):
    name = "swiglu"
    description = "silu(x W1) * (x W3) -> W2, hidden 8C/3  (Shazeer 2020)"
    uses_matmul = True

    def __init__(self, config, matmul: Matmul | None = None):
        super().__init__(config)
        h = swiglu_hidden(config.n_embd)
        self.c_fc = Linear(config.n_embd, 2 * h, config.bias, matmul)  # W1 and W3 side by side
        self.c_proj = Linear(h, config.n_embd, config.bias, matmul)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # (B, T, h) each
        y = self.c_proj(F.silu(gate) * up)
        return self.dropout(y) if self.training else y


class NoMLP(FeedForward):
    """No MLP: the sub-layer contributes nothing, ``(B, T, C) -> zeros (B, T, C)``, so a residual
    block computes ``x + 0``; no parameters. A block without residual connections must skip the
    sub-layer instead (zeros would replace x there): :class:`gptlab.nn.PlainBlock` does."""

    name = "none"
    description = "no MLP: the block's MLP sub-layer adds nothing (the ladder's first rungs)"

    def forward(self, x):
        return torch.zeros_like(x)
