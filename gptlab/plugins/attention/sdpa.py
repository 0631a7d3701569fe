"""The ``sdpa`` backend: torch's ``scaled_dot_product_attention``, the reference peer.

Torch dispatches it to its own fused kernels (flash / memory-efficient / math). Its ``is_causal``
aligns the mask top-left, so for fewer queries than keys (KV-cache decoding) an explicit
bottom-right mask is passed instead.
"""

import torch
from torch.nn import functional as F

from gptlab import AttentionBackend
from gptlab.nn import causal_mask


class SdpaAttention(AttentionBackend):
    name = "sdpa"
    priority = 50
    description = "torch.nn.functional.scaled_dot_product_attention (reference peer)"
    stores_scores = False  # torch picks a flash kernel for causal attention: O(T) memory
    devices = frozenset({"cpu", "cuda", "mps"})
    dtypes = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})
    supports_dropout = True
    deterministic = False  # torch's CUDA kernels may use atomics

    def forward(self, q, k, v, *, causal=True, dropout_p=0.0, scale=None):
        tq, tk = q.size(-2), k.size(-2)
        if causal and tq == 1:  # one query (decoding) is the last row: it sees every key
            causal = False
        if causal and tq != tk:
            mask = causal_mask(tq, tk, device=q.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                               scale=scale)
            if tq > tk:  # rows that see no key give 0 (not every torch version ensures it)
                y = y.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
            return y
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p,
                                              scale=scale)
