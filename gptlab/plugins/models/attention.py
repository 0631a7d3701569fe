"""Self-attention modules: one head, and many heads concatenated and projected.

Scaled dot-product attention (Vaswani et al. 2017, section 3.2): each position emits a query,
a key and a value; ``softmax(Q K^T / sqrt(head_dim) + causal mask) V``. The arithmetic of that
formula is delegated to an :class:`~gptlab.core.interfaces.AttentionBackend` (naive, sdpa,
fused, flash, or a plugin's), so backends can be swapped without touching the model.
"""

import torch
import torch.nn as nn

from gptlab.core.interfaces import AttentionBackend


class LayerKV:
    """One layer's cached keys and values, (B, nh, T_cached, hs) each."""

    def __init__(self):
        self.k = self.v = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values; return all keys/values so far."""
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


class SingleHeadAttention(nn.Module):
    """One causal attention head: ``(B, T, C) -> (B, T, head_size)``."""

    def __init__(self, n_embd: int, head_size: int, attention: AttentionBackend,
                 dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.query = nn.Linear(n_embd, head_size, bias=bias)
        self.key = nn.Linear(n_embd, head_size, bias=bias)
        self.value = nn.Linear(n_embd, head_size, bias=bias)
        self.attention = attention
        self.dropout = dropout

    def forward(self, x):
        q = self.query(x).unsqueeze(1)  # (B, 1, T, hs): a batch of one head
        k = self.key(x).unsqueeze(1)
        v = self.value(x).unsqueeze(1)
        p = self.dropout if self.training else 0.0
        return self.attention(q, k, v, causal=True, dropout_p=p).squeeze(1)  # (B, T, hs)


class MultiHeadAttention(nn.Module):
    """``n_head`` heads side by side, concatenated, then an output projection.

    The per-head query/key/value projections are stored as one ``Linear(C, 3C)`` so that all
    heads run in one batched backend call on ``(B, n_head, T, head_size)`` tensors; the result
    equals running :class:`SingleHeadAttention` per head and concatenating (tested).
    """

    def __init__(self, config, attention: AttentionBackend):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True  # scaled at init, see Transformer._init_weights
        self.attention = attention
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache: LayerKV | None = None):
        B, T, C = x.shape
        hs = C // self.n_head
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, hs)  # q, k, v for every head
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        if kv_cache is not None:  # decoding: T new queries against every key so far
            k, v = kv_cache.extend(k, v)  # (B, nh, T_past + T, hs); causal mask bottom-right
        p = self.attn_dropout if self.training else 0.0
        y = self.attention(q, k, v, causal=True, dropout_p=p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # concatenate heads: (B, T, C)
        y = self.c_proj(y)
        return self.resid_dropout(y) if self.training else y
