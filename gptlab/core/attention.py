"""The attention interface: what a model asks for (:class:`AttentionRequest`) and what serves it
(:class:`AttentionBackend`), plus the causal mask and the default scale.

Attention is scaled dot-product attention (Vaswani et al. 2017, "Attention Is All You Need",
eq. 1): ``softmax(scale * Q K^T + mask) V`` with ``scale = 1/sqrt(head_dim)``. A backend is an
:class:`~gptlab.core.selection.Implementation`: it declares what it supports (devices, dtypes,
head dims, backward, dropout, decoding) and answers ``not_supported_reasons(request)`` in
readable strings, so :func:`gptlab.core.selection.select` can pick one (``auto``) or explain
why a named one cannot run.

Causal masks follow FlashAttention's convention (Dao 2023): with ``q_len`` queries and
``k_len`` keys the mask is aligned bottom-right, so query ``i`` sees keys
``j <= i + (k_len - q_len)``. With fewer queries than keys this is KV-cache decoding; with more
queries than keys the first ``q_len - k_len`` rows see no key and their output is 0.
"""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import torch

from gptlab.core.errors import BackendNotSupportedError, ConfigError
from gptlab.core.selection import (Implementation, Request, dtype_name, not_supported_message,
                                   reasons_of)


@attrs.frozen(kw_only=True)
class AttentionRequest(Request):
    """What a model will ask of an attention backend: device and dtype of q, k, v, and the
    shape and kind of the call."""

    head_dim: int = 64
    q_len: int = 128
    k_len: int = 128
    causal: bool = True
    dropout_p: float = 0.0
    requires_grad: bool = True

    @classmethod
    def from_tensors(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     causal: bool = True, dropout_p: float = 0.0) -> AttentionRequest:
        """The request a call ``backend(q, k, v, ...)`` makes; checks that the shapes agree."""
        check_qkv(q, k, v)
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                            or v.requires_grad)
        return cls(device=q.device.type, dtype=q.dtype, head_dim=q.size(-1), q_len=q.size(-2),
                   k_len=k.size(-2), causal=causal, dropout_p=dropout_p, requires_grad=grad)

    def describe(self) -> str:
        """One line: ``device cpu, float32, head_dim 32, q_len 128, k_len 128, causal, ...``."""
        parts = [f"device {self.device}", dtype_name(self.dtype), f"head_dim {self.head_dim}",
                 f"q_len {self.q_len}", f"k_len {self.k_len}",
                 "causal" if self.causal else "not causal",
                 "with backward" if self.requires_grad else "forward only"]
        if self.dropout_p:
            parts.append(f"dropout {self.dropout_p:g}")
        return ", ".join(parts)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q (B, nh, Tq, hs), k and v (B, nh, Tk, hs): same batch, heads, head dim, dtype, device."""
    if not q.dim() == k.dim() == v.dim() == 4:
        raise ConfigError(f"attention takes 4-D (batch, heads, seq, head_dim) q, k, v; got "
                          f"{q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    if not (q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2]
            and q.shape[3] == k.shape[3] == v.shape[3]):
        raise ConfigError(f"attention shapes do not agree: q {tuple(q.shape)}, k "
                          f"{tuple(k.shape)}, v {tuple(v.shape)}; k and v need q's batch, heads "
                          f"and head_dim, and one length")
    if not q.dtype == k.dtype == v.dtype:
        raise ConfigError(f"q, k, v have different dtypes ({dtype_name(q.dtype)}, "
                          f"{dtype_name(k.dtype)}, {dtype_name(v.dtype)}); cast them to one")
    if not q.device == k.device == v.device:
        raise ConfigError(f"q, k, v are on different devices ({q.device}, {k.device}, "
                          f"{v.device}); move them to one")


class AttentionBackend(Implementation):
    """Computes ``softmax(scale * q @ k^T [+ causal mask]) @ v`` on ``(B, n_head, T, head_dim)``.

    Subclasses set the capability constants and implement :meth:`forward`; the default
    :meth:`not_supported_reasons` checks them (override
    :meth:`~gptlab.core.selection.Implementation.unavailable_reasons` for environment problems:
    a library or compiler missing). Calling an instance (``backend(q, k, v)``) runs the same
    checks as selection first.
    """

    min_head_dim: ClassVar[int] = 1
    max_head_dim: ClassVar[int] = 1 << 16
    supports_backward: ClassVar[bool] = True
    supports_dropout: ClassVar[bool] = False
    supports_causal: ClassVar[bool] = True
    supports_non_causal: ClassVar[bool] = True
    supports_q_shorter_than_k: ClassVar[bool] = True  # bottom-right causal alignment
    deterministic: ClassVar[bool] = True
    #: It holds the (B, heads, T, T) scores, so its memory grows as T squared (what ``gpt bench
    #: attention`` sizes its points by); a backend that does not (flash) says False.
    stores_scores: ClassVar[bool] = True

    @classmethod
    def is_deterministic(cls, device: str) -> bool:
        """Whether repeated calls on ``device`` give bit-identical results."""
        return cls.deterministic

    @classmethod
    def not_supported_reasons(cls, request: AttentionRequest) -> list[str]:
        """Readable reasons why ``request`` cannot be served; empty means supported."""
        r = super().not_supported_reasons(request)
        if not cls.min_head_dim <= request.head_dim <= cls.max_head_dim:
            r.append(f"head_dim {request.head_dim} outside [{cls.min_head_dim}, "
                     f"{cls.max_head_dim}]")
        if request.requires_grad and not cls.supports_backward:
            r.append("backward (training) not supported")
        if request.dropout_p > 0 and not cls.supports_dropout:
            r.append(f"attention dropout (p={request.dropout_p}) not supported")
        if request.causal and not cls.supports_causal:
            r.append("causal masking not supported")
        if not request.causal and not cls.supports_non_causal:
            r.append("non-causal attention not supported")
        if request.q_len != request.k_len and not cls.supports_q_shorter_than_k:
            r.append("query length different from key length (KV-cache decoding) not supported")
        return r

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, q, k, v, *, causal: bool = True, dropout_p: float = 0.0,
                 scale: float | None = None) -> torch.Tensor:
        """Check the call as selection would (shapes, then the backend's reasons), then run it.

        The checks are skipped while ``torch.compile`` traces (they ran when the model was built,
        and Python-level checks would break the graph)."""
        if not torch.compiler.is_compiling():
            grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                or v.requires_grad)
            key = (type(self), q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device,
                   k.device, v.device, causal, dropout_p, grad)
            if key not in _PASSED:  # a call like one that passed before is not checked again
                request = AttentionRequest.from_tensors(q, k, v, causal=causal,
                                                        dropout_p=dropout_p)
                reasons = reasons_of(type(self), request)
                if reasons:
                    raise BackendNotSupportedError(not_supported_message(
                        "attention backend", self.name, request, reasons,
                        "pick another with --attention (see `gpt backends`)"))
                if len(_PASSED) >= _PASSED_MAX:
                    _PASSED.clear()
                _PASSED.add(key)
        return self.forward(q, k, v, causal=causal, dropout_p=dropout_p, scale=scale)

    def __repr__(self):
        return f"<attention backend {self.name!r}>"


#: Calls (backend class and the facts of q, k, v) that passed the checks: a training step or a
#: decoded token repeats the same few, so the checks cost one set lookup after the first.
_PASSED: set[tuple] = set()
_PASSED_MAX = 4096


def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """Boolean (q_len, k_len) mask, True where query i may see key j (bottom-right aligned)."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def default_scale(head_dim: int, scale: float | None) -> float:
    """``1/sqrt(head_dim)`` unless a scale is given (Vaswani et al. 2017, section 3.2.1)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else scale
