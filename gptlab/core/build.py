"""Turning names into objects: device resolution, attention dispatch and model construction.

Dispatch follows xformers ``fmha``: ``auto`` takes the highest-priority backend whose
``not_supported_reasons(request)`` is empty; a backend named explicitly either fits or raises
:class:`~gptlab.core.errors.BackendNotSupportedError` listing its reasons, never a silent
fallback.
"""

from __future__ import annotations

import logging

import torch

from gptlab.core.config import ModelConfig
from gptlab.core.errors import (BackendNotSupportedError, DeviceError, GptlabError,
                                UnknownComponentError)
from gptlab.core.interfaces import (AttentionBackend, AttentionRequest, Components, LanguageModel,
                                    device_unavailable_reason)
from gptlab.core.plugins import Registry

AUTO = "auto"
log = logging.getLogger(__name__)


def _parse_device(name: str) -> torch.device:
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``; unavailable devices raise DeviceError."""
    dev = _parse_device(name)
    why = device_unavailable_reason(dev.type)
    if why:
        raise DeviceError(f"device {dev.type!r} is not available: {why}; use --device cpu")
    return dev


def device_type(name: str) -> str:
    """The device type a ``--device`` value names (``auto`` resolved), without checking it."""
    return _parse_device(name).type


def backend_table(reg: Registry, request: AttentionRequest) -> list[tuple[type, list[str]]]:
    """Every registered backend with its reasons for ``request``, highest priority first."""
    rows = [(cls, cls.not_supported_reasons(request)) for cls in reg.attention_backends.values()]
    return sorted(rows, key=lambda r: (-r[0].priority, r[0].name))


def select_attention(reg: Registry, name: str, request: AttentionRequest) -> AttentionBackend:
    """Return an instance of the backend called ``name`` (or the best one for ``auto``)."""
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
        detail = "; ".join(f"{cls.name}: {', '.join(r)}" for cls, r in rows) or "none registered"
        raise BackendNotSupportedError(f"no attention backend supports this request ({detail})")
    if name not in reg.attention_backends:
        raise UnknownComponentError(
            f"unknown attention backend {name!r}; available: "
            f"{', '.join([AUTO, *sorted(reg.attention_backends)])}"
        )
    cls = reg.attention_backends[name]
    reasons = cls.not_supported_reasons(request)
    if reasons:
        raise BackendNotSupportedError(
            f"attention backend {name!r} cannot run here: {'; '.join(reasons)}"
        )
    cls.prepare(request)
    return cls()


def attention_request(config: ModelConfig, device: torch.device | str, *,
                      requires_grad: bool = True) -> AttentionRequest:
    device = device if isinstance(device, str) else device.type
    return AttentionRequest(device=device, dtype=torch.float32, head_dim=config.head_dim,
                            q_len=config.block_size, k_len=config.block_size, causal=True,
                            dropout_p=config.dropout, requires_grad=requires_grad)


def build_model(reg: Registry, config: ModelConfig, device: torch.device | str = "cpu", *,
                requires_grad: bool = True) -> LanguageModel:
    """Build ``config.model`` with its block and attention backend, on ``device``."""
    device = torch.device(device)
    model_cls = reg.model(config.model)
    components = Components()
    if model_cls.uses_attention:
        block = reg.block(config.block)
        request = attention_request(config, device, requires_grad=requires_grad)
        components = Components(block=block, attention=select_attention(reg, config.attention,
                                                                        request))
    return model_cls(config, components).to(device)


__all__ = ["AUTO", "backend_table", "build_model", "device_type", "resolve_device",
           "select_attention",
           "attention_request", "UnknownComponentError"]
