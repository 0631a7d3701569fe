"""The naive attention backend: the formula written out with explicit tensors.

``S = scale * Q K^T`` (B, nh, Tq, Tk); masked entries set to -inf; ``P = softmax(S)``; ``Y = P V``.
It materialises the whole T x T score matrix (and autograd keeps it for backward), which is what
the fused and flash kernels avoid (Vaswani et al. 2017, eq. 1).
"""

import torch
from torch.nn import functional as F

from gptlab import AttentionBackend
from gptlab.nn import causal_mask, default_scale


class NaiveAttention(AttentionBackend):
    name = "naive"
    priority = 10
    description = "explicit matmul, mask, softmax, matmul; stores the T x T matrix"
    devices = frozenset({"cpu", "cuda", "mps"})
    dtypes = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})
    supports_dropout = True
    deterministic = True

    def forward(self, q, k, v, *, causal=True, dropout_p=0.0, scale=None):
        scale = default_scale(q.size(-1), scale)
        att = (q @ k.transpose(-2, -1)) * scale  # (B, nh, Tq, Tk)
        tq, tk = q.size(-2), k.size(-2)
        blind = None  # rows that see no key: with more queries than keys, the first tq - tk
        if causal and tq > 1:  # one query (decoding) is the last row: sees every key
            mask = causal_mask(tq, tk, device=q.device)
            if tq > tk:  # their output is 0 (FlashAttention's convention), never NaN
                blind = ~mask.any(dim=-1, keepdim=True)  # (Tq, 1)
                mask = mask | blind  # a finite softmax there, zeroed below
            att = att.masked_fill(~mask, float("-inf"))
        att = F.softmax(att, dim=-1)
        if blind is not None:
            att = att.masked_fill(blind, 0.0)
        if dropout_p > 0:
            att = F.dropout(att, p=dropout_p)
        return att @ v  # (B, nh, Tq, hs)
