"""Attention dispatch: from a backend name (or ``auto``) and a request to a ready backend.

Follows xformers ``fmha``: ``auto`` takes the highest-priority backend whose
``not_supported_reasons(request)`` is empty (and whose ``prepare(request)`` succeeds); a backend
named explicitly either fits or raises :class:`~gptlab.core.errors.BackendNotSupportedError`,
never a silent fallback. Both errors show the request and one line of reasons per backend.
"""

from __future__ import annotations

import logging

import torch

from gptlab.core.attention import (
    AttentionBackend,
    AttentionRequest,
    not_supported_message,
)
from gptlab.core.config import ModelConfig
from gptlab.core.devices import AUTO
from gptlab.core.errors import (
    BackendNotSupportedError,
    GptlabError,
    UnknownComponentError,
)
from gptlab.core.plugins import Registry

log = logging.getLogger(__name__)


def backend_table(reg: Registry, request: AttentionRequest) -> list[tuple[type, list[str]]]:
    """Every registered backend with its reasons for ``request``, highest priority first.

    A backend whose ``not_supported_reasons`` raises is listed with that as its reason (a
    broken plugin must not take dispatch down)."""
    rows = []
    for cls in reg.attention_backends.values():
        try:
            reasons = list(cls.not_supported_reasons(request))
        except Exception as e:  # a plugin's bug: report it, move on
            reasons = [f"not_supported_reasons() raised {type(e).__name__}: {e}"]
        rows.append((cls, reasons))
    return sorted(rows, key=lambda r: (-r[0].priority, r[0].name))


def select_attention(reg: Registry, name: str, request: AttentionRequest, *,
                     fix: str | None = None) -> AttentionBackend:
    """Return a prepared instance of the backend called ``name`` (or the best one for ``auto``).

    ``fix``: what the error for a named backend that cannot run tells the user to do."""
    if name == AUTO:
        rows = backend_table(reg, request)
        for i, (cls, reasons) in enumerate(rows):
            if not reasons:
                try:
                    cls.prepare(request)
                    return cls()
                except GptlabError as e:  # e.g. its kernels failed to build: auto moves on
                    log.warning("attention backend %r skipped by auto: %s", cls.name, e)
                    rows[i] = (cls, [str(e)])
        lines = [f"  {cls.name}: {'; '.join(r)}" for cls, r in rows] or ["  (none registered)"]
        raise BackendNotSupportedError(
            "no attention backend can run this request; change the request (device, dropout, "
            "head dim) or install a backend that fits\n"
            f"  request: {request.describe()}\n" + "\n".join(lines))
    if name not in reg.attention_backends:
        raise UnknownComponentError(
            f"unknown attention backend {name!r}; available: "
            f"{', '.join([AUTO, *sorted(reg.attention_backends)])}")
    cls = reg.attention_backends[name]
    reasons = cls.not_supported_reasons(request)
    if reasons:
        kw = {} if fix is None else {"fix": fix}
        raise BackendNotSupportedError(not_supported_message(name, request, reasons, **kw))
    cls.prepare(request)
    return cls()


def attention_request(config: ModelConfig, device: torch.device | str, *,
                      requires_grad: bool = True) -> AttentionRequest:
    """The request a model built from ``config`` makes when trained (or run) on ``device``."""
    device = device if isinstance(device, str) else device.type
    return AttentionRequest(device=device, dtype=torch.float32, head_dim=config.head_dim,
                            q_len=config.block_size, k_len=config.block_size, causal=True,
                            dropout_p=config.dropout, requires_grad=requires_grad)
