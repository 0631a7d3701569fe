"""Feed-forward variants newer than GPT-2's GELU MLP.

- ReLU² (So et al. 2021, "Primer"): ``Linear(C, 4C) -> relu(x)^2 -> Linear(4C, C)``; found by
  architecture search, used by the nanoGPT speedrun.
- SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"): ``(silu(x W1) * (x W3)) W2``. It has
  three matrices instead of two, so its hidden width is 2/3 of 4C (rounded up to a multiple of
  8): the parameter count stays close to the GELU MLP's (PaLM and LLaMA do the same).

Both keep the interface of :class:`gptlab.nn.MLP`: built as ``cls(config)``, the last Linear
(into the residual stream) is ``c_proj``.
"""

from __future__ import annotations

import torch.nn as nn
from torch.nn import functional as F

from gptlab.core.interfaces import FeedForward


class ReLU2MLP(FeedForward):
    name = "relu2"
    description = "Linear(C, 4C) -> relu(x)^2 -> Linear(4C, C)  (Primer, So et al. 2021)"

    def __init__(self, config):
        super().__init__(config)
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
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

    def __init__(self, config):
        super().__init__(config)
        h = swiglu_hidden(config.n_embd)
        self.c_fc = nn.Linear(config.n_embd, 2 * h, bias=config.bias)  # W1 and W3 side by side
        self.c_proj = nn.Linear(h, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # (B, T, h) each
        y = self.c_proj(F.silu(gate) * up)
        return self.dropout(y) if self.training else y
