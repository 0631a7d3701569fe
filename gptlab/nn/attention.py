"""Self-attention modules: one head, and many heads concatenated and projected.

Scaled dot-product attention (Vaswani et al. 2017, section 3.2): each position emits a query,
a key and a value; ``softmax(Q K^T / sqrt(head_dim) + causal mask) V``. The arithmetic of that
formula is delegated to an :class:`~gptlab.core.attention.AttentionBackend` (naive, sdpa,
fused, flash, or a plugin's), so backends can be swapped without touching the model.
:func:`attention_weights` writes the weights out (the softmax alone), whatever the backend: each
module's ``attention_weights(x)`` recomputes the weights its heads put on every earlier
position (``gpt attention`` draws them).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F

from gptlab.core.attention import AttentionBackend, causal_mask, default_scale
from gptlab.core.interfaces import PositionScheme
from gptlab.core.matmuls import Matmul
from gptlab.nn.linear import Linear
from gptlab.nn.positions import qk_seam


class LayerKV:
    """One layer's cached keys and values, (B, nh, T_cached, hs) each.

    The storage is allocated on the first :meth:`extend`, for ``max_len`` tokens (the model's
    ``block_size``): ``(B, nh, max_len, hs)`` for keys and for values. Each step writes its new
    keys and values into the next free slice and returns views of the filled prefix, so a step
    copies only its own tokens (``torch.cat`` would copy every cached token again, per token,
    per layer). A cache that outgrows its storage (or was given no ``max_len``) doubles it.
    """

    def __init__(self, max_len: int | None = None):
        self.max_len = max_len
        self.length = 0  # tokens cached so far: the position of the next token in this window
        self._k = self._v = None  # storage (B, nh, capacity, hs); the first `length` are filled

    @property
    def k(self) -> torch.Tensor | None:
        """Cached keys (B, nh, length, hs), or None before the first :meth:`extend`."""
        return None if self._k is None else self._k[:, :, :self.length]

    @property
    def v(self) -> torch.Tensor | None:
        """Cached values (B, nh, length, hs), or None before the first :meth:`extend`."""
        return None if self._v is None else self._v[:, :, :self.length]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values (B, nh, T, hs); return all keys/values so far."""
        start, end = self.length, self.length + k.size(2)
        if self._k is None or end > self._k.size(2):
            self._grow(k, v, end)
        self._k[:, :, start:end] = k
        self._v[:, :, start:end] = v
        self.length = end
        return self._k[:, :, :end], self._v[:, :, :end]  # (B, nh, end, hs) views

    def storage(self, B: int, nh: int, hs: int, like: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole storage, keys and values (B, nh, capacity, hs) each, with room for one
        more token: for a step that writes row :attr:`length` itself and then advances
        :attr:`length` (the fused decoding kernel)."""
        if self._k is None or self.length + 1 > self._k.size(2):
            new = like.new_empty(B, nh, 1, hs)
            self._grow(new, new, self.length + 1)
        return self._k, self._v

    def _grow(self, k: torch.Tensor, v: torch.Tensor, needed: int) -> None:
        """New storage for at least ``needed`` tokens (``max_len``, or twice what there was),
        holding the tokens cached so far."""
        B, nh, _, hs = k.shape
        capacity = max(needed, self.max_len or 0, 2 * self.length)
        old_k, old_v = self.k, self.v
        self._k = k.new_empty(B, nh, capacity, hs)
        self._v = v.new_empty(B, nh, capacity, v.size(-1))
        if self.length:
            self._k[:, :, :self.length] = old_k
            self._v[:, :, :self.length] = old_v


def attention_weights(q: torch.Tensor, k: torch.Tensor, scale: float | None = None
                      ) -> torch.Tensor:
    """``softmax(scale * q k^T + causal mask)``, written out: (..., T, T) for q and k (..., T, hs).

    Row ``i`` holds the weights query ``i`` puts on keys ``0..i`` (they sum to 1); every entry
    above the diagonal is 0. A backend's output is these weights times v."""
    T = q.size(-2)
    att = (q @ k.transpose(-2, -1)) * default_scale(q.size(-1), scale)  # (..., T, T)
    att = att.masked_fill(~causal_mask(T, T, device=q.device), float("-inf"))
    return F.softmax(att, dim=-1)


def _head_views(qkv: torch.Tensor, n_head: int) -> tuple[torch.Tensor, ...]:
    B, T, C3 = qkv.shape
    heads = qkv.view(B, T, 3, n_head, C3 // (3 * n_head))  # (B, T, 3, nh, hs)
    return tuple(heads[:, :, i].transpose(1, 2) for i in range(3))  # (B, nh, T, hs) each


def projection_parts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether q, k, v (B, nh, T, hs) are the three parts of one (B, T, 3C) tensor as
    :func:`split_heads` makes them: one storage, strides (T*3C, hs, 3C, 1), k C elements after
    q and v C after k."""
    if q.dim() != 4 or not q.shape == k.shape == v.shape:
        return False
    B, nh, T, hs = q.shape
    C = nh * hs
    parts = (T * 3 * C, hs, 3 * C, 1)
    base = q.untyped_storage().data_ptr()
    return all(t.stride() == parts and t.untyped_storage().data_ptr() == base
               and t.storage_offset() == q.storage_offset() + i * C
               for i, t in enumerate((q, k, v)))


class SplitHeads(torch.autograd.Function):
    """``qkv`` (B, T, 3C) -> q, k, v (B, nh, T, hs): views of the projection, with strides
    (T*3C, hs, 3C, 1), so backends that take strided inputs (flash, sdpa) copy nothing.

    The backward is the concatenation of the three gradients into one (B, T, 3C) gradient (what
    ``split`` would do), without a copy when they already are that tensor's three parts: the
    flash backend writes them so."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, n_head: int):
        return _head_views(qkv, n_head)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        B, nh, T, hs = dq.shape
        C = nh * hs
        if projection_parts(dq, dk, dv):
            return dq.as_strided((B, T, 3 * C), (T * 3 * C, 3 * C, 1)), None  # no copy
        return torch.cat([g.transpose(1, 2).reshape(B, T, C) for g in (dq, dk, dv)], 2), None


def split_heads(qkv: torch.Tensor, n_head: int) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, nh, T, hs) as views of the projection ``qkv`` (B, T, 3C): by
    :class:`SplitHeads` in eager mode; under ``torch.compile``, by plain views (the compiler
    plans its own memory)."""
    if torch.compiler.is_compiling():
        return _head_views(qkv, n_head)
    return SplitHeads.apply(qkv, n_head)


class SingleHeadAttention(nn.Module):
    """One causal attention head: ``(B, T, C) -> (B, T, head_size)``: its own query, key and
    value projections and no output projection (:class:`gptlab.nn.SingleHeadBlock` uses one as
    wide as the model)."""

    def __init__(self, n_embd: int, head_size: int, attention: AttentionBackend,
                 dropout: float = 0.0, bias: bool = False, matmul: Matmul | None = None):
        super().__init__()
        self.query = Linear(n_embd, head_size, bias, matmul)
        self.key = Linear(n_embd, head_size, bias, matmul)
        self.value = Linear(n_embd, head_size, bias, matmul)
        self.attention = attention
        self.dropout = dropout

    def forward(self, x):
        q = self.query(x).unsqueeze(1)  # (B, 1, T, hs): a batch of one head
        k = self.key(x).unsqueeze(1)
        v = self.value(x).unsqueeze(1)
        p = self.dropout if self.training else 0.0
        return self.attention(q, k, v, causal=True, dropout_p=p).squeeze(1)  # (B, T, hs)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The weights (B, 1, T, T) this head puts on each position of ``x`` (B, T, C),
        written out (:func:`attention_weights`), whatever the backend."""
        return attention_weights(self.query(x).unsqueeze(1), self.key(x).unsqueeze(1))


class MultiHeadAttention(nn.Module):
    """``n_head`` heads side by side, concatenated, then an output projection.

    The per-head query/key/value projections are stored as one ``Linear(C, 3C)`` so that all
    heads run in one batched backend call on ``(B, n_head, T, head_size)`` tensors; the result
    equals running :class:`SingleHeadAttention` per head and concatenating (tested).

    **The position seam.** Between the q/k/v split and the backend call, ``qk_positions`` (a
    module, or None) may transform the new queries and keys given their absolute positions:
    ``q, k = qk_positions(q, k, pos)`` with q and k ``(B, nh, T, hs)`` and ``pos`` ``(T,)``
    int64. With the KV cache, ``pos`` continues after the tokens already cached, and the keys
    are cached after the transform, so a rotary embedding (Su et al. 2021) written as such a
    module works with and without the cache. It is built here from the position scheme
    (``--position``, its :meth:`~gptlab.core.interfaces.PositionScheme.qk_module`) and
    ``config.qk_norm`` (:func:`gptlab.nn.positions.qk_seam`).
    """

    def __init__(self, config, attention: AttentionBackend,
                 position: type[PositionScheme] | None = None, matmul: Matmul | None = None):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, config.bias, matmul)
        self.c_proj = Linear(config.n_embd, config.n_embd, config.bias, matmul)
        self.attention = attention
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.qk_positions = qk_seam(config, position)  # None: q and k as projected

    def qkv(self, x: torch.Tensor, start: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of every head for ``x`` (B, T, C), (B, nh, T, hs) each, q and k through the
        position seam at positions ``start .. start + T - 1``."""
        B, T, C = x.shape
        q, k, v = split_heads(self.c_attn(x), self.n_head)  # (B, nh, T, hs) each: views
        if self.qk_positions is not None:  # the position seam
            pos = torch.arange(start, start + T, dtype=torch.long, device=x.device)  # (T,)
            q, k = self.qk_positions(q, k, pos)
        return q, k, v

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The weights (B, nh, T, T) each head puts on each position of ``x`` (B, T, C),
        written out (:func:`attention_weights`) from the q and k this module computes, whatever
        backend its forward runs."""
        q, k, _ = self.qkv(x)
        return attention_weights(q, k)

    def forward(self, x, kv_cache: LayerKV | None = None):
        B, T, C = x.shape
        q, k, v = self.qkv(x, 0 if kv_cache is None else kv_cache.length)
        if kv_cache is not None:  # decoding: T new queries against every key so far
            k, v = kv_cache.extend(k, v)  # (B, nh, T_past + T, hs); causal mask bottom-right
        p = self.attn_dropout if self.training else 0.0
        y = self.attention(q, k, v, causal=True, dropout_p=p)  # (B, nh, T, hs)
        # concatenate heads: (B, T, C); a view when y is laid out (B, T, nh, hs), as flash
        # writes it
        y = y.transpose(1, 2).reshape(B, T, C)
        y = self.c_proj(y)
        return self.resid_dropout(y) if self.training else y
