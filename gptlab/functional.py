"""gptlab's attention backends behind the signature of ``F.scaled_dot_product_attention``.

For someone with their own model (nanoGPT's, say), one line swaps torch's attention for
gptlab's kernels::

    from gptlab.functional import attention
    y = attention(q, k, v, is_causal=True)              # was F.scaled_dot_product_attention
    y = attention(q, k, v, is_causal=True, backend="flash")

q, k, v are ``(B, n_head, T, head_dim)``. ``backend="auto"`` picks, per request (device, dtype,
head dim, lengths, grad, dropout), the highest-priority installed backend that can run it; a
named backend that cannot is a :class:`~gptlab.core.errors.BackendNotSupportedError` listing its
reasons. The choice is made once per distinct request and remembered. Differences from torch's
function: no ``attn_mask`` (causal or none), and with ``is_causal`` and ``q_len != k_len`` the
mask is aligned bottom-right (FlashAttention's convention: the last query sees every key; rows
that see no key give 0), where torch aligns it top-left.
"""

from __future__ import annotations

import functools
import logging

import torch

from gptlab.core.attention import AttentionBackend, AttentionRequest
from gptlab.core.devices import AUTO
from gptlab.core.errors import ConfigError

log = logging.getLogger(__name__)


@functools.cache
def _registry():
    from gptlab.core.plugins import load_registry

    reg = load_registry()
    for problem in reg.problems:  # a broken plugin is said once, not silently dropped
        log.warning(problem)
    return reg


@functools.lru_cache(maxsize=1024)
def _select(name: str, request: AttentionRequest) -> AttentionBackend:
    from gptlab.core.selection import select

    return select(_registry(), "attention_backends", name, request)()


@torch.compiler.disable  # dispatch is Python bookkeeping: run it eagerly, trace the kernel
def backend_for(name: str, request: AttentionRequest) -> AttentionBackend:
    """The backend ``name`` (or ``auto``'s choice) for ``request``, dispatched once per request."""
    return _select(name, request)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None, *,
              backend: str = AUTO) -> torch.Tensor:
    """``softmax(scale * q k^T [+ causal mask]) v`` on ``(B, nh, T, hs)`` by a gptlab backend."""
    if attn_mask is not None:
        raise ConfigError("gptlab's attention takes no attn_mask: pass is_causal=True for the "
                          "causal mask, or use torch's F.scaled_dot_product_attention")
    request = AttentionRequest.from_tensors(query, key, value, causal=is_causal,
                                            dropout_p=dropout_p)
    impl = backend_for(backend, request)
    return impl.forward(query, key, value, causal=is_causal, dropout_p=dropout_p, scale=scale)
