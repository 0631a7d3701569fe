"""Attention dispatch: from a backend name (or ``auto``) and a request to a ready backend.

Follows xformers ``fmha``: ``auto`` takes the highest-priority backend whose
``not_supported_reasons(request)`` is empty (and whose ``prepare(request)`` succeeds), or, when
the caller says the shape of the work, the fastest such backend measured on it
(:mod:`gptlab.core.autotune`); a backend
named explicitly either fits or raises :class:`~gptlab.core.errors.BackendNotSupportedError`,
never a silent fallback. Both errors show the request and one line of reasons per backend. A
backend whose ``not_supported_reasons`` or ``prepare`` raises (a plugin's bug) has that error as
its reason: ``auto`` moves on, a named one is refused with it.
"""

from __future__ import annotations

import logging

import torch

from gptlab.core import autotune
from gptlab.core.attention import (
    AttentionBackend,
    AttentionRequest,
    backend_reasons,
    not_supported_message,
)
from gptlab.core.config import ModelConfig
from gptlab.core.devices import AUTO
from gptlab.core.errors import BackendNotSupportedError, GptlabError, UnknownComponentError
from gptlab.core.autotune import Workload
from gptlab.core.layer_kernels import KernelRequest, LayerKernels
from gptlab.core.plugins import Registry

log = logging.getLogger(__name__)


def backend_table(reg: Registry, request: AttentionRequest | KernelRequest, *,
                  kind: str = "attention_backends") -> list[tuple[type, list[str]]]:
    """Every registered backend (or, with ``kind="layer_kernels"``, layer kernels) with its
    reasons for ``request``, highest priority for the request first (``priority_for``).

    A backend whose ``not_supported_reasons`` raises is listed with that as its reason (a
    broken plugin must not take dispatch down)."""
    rows = [(cls, backend_reasons(cls, request)) for cls in getattr(reg, kind).values()]
    return sorted(rows, key=lambda r: (-priority_of(r[0], request), r[0].name))


def priority_of(cls, request) -> int:
    """``cls.priority_for(request)``; a plugin whose method raises (or that has none) keeps its
    plain ``priority`` (its reasons will say what is wrong, if anything)."""
    try:
        return int(cls.priority_for(request))
    except Exception:
        return int(getattr(cls, "priority", 0))


def _prepare_failure(e: Exception) -> str:
    """Why ``prepare`` failed: a gptlab error's own message, else the plugin's bug as such."""
    return str(e) if isinstance(e, GptlabError) else f"prepare() raised {type(e).__name__}: {e}"


def select_attention(reg: Registry, name: str, request: AttentionRequest, *,
                     fix: str | None = None, work: Workload | None = None,
                     prefer: str | None = None) -> AttentionBackend:
    """Return a prepared instance of the backend called ``name`` (or the best one for ``auto``).

    ``fix``: what the error for a named backend that cannot run tells the user to do.
    For ``auto``: ``prefer`` names a backend to take if it can run (a resumed run's); else, given
    the ``work`` (batch, heads) and unless ``$GPTLAB_AUTO=priority``, the candidates are timed on
    it (:mod:`gptlab.core.autotune`); else the highest priority that can run is taken."""
    if name == AUTO:
        rows = backend_table(reg, request)
        if prefer is not None:  # keep a resumed run on the backend it was trained with
            rows.sort(key=lambda r: r[0].name != prefer)
        ready = []
        for i, (cls, reasons) in enumerate(rows):
            if not reasons:
                try:
                    cls.prepare(request)
                except Exception as e:  # its kernels failed to build, a plugin's bug: move on
                    reason = _prepare_failure(e)
                    log.warning("attention backend %r skipped by auto: %s", cls.name, reason)
                    rows[i] = (cls, [reason])
                else:
                    if prefer is not None or work is None or not autotune.measuring():
                        return cls()
                    ready.append(cls)
        if ready:
            return autotune.measured_choice(ready, request, work)()
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
    reasons = backend_reasons(cls, request)
    if not reasons:
        try:
            cls.prepare(request)
        except GptlabError:
            raise  # its own message (e.g. how to build its kernels)
        except Exception as e:
            reasons = [_prepare_failure(e)]
        else:
            return cls()
    kw = {} if fix is None else {"fix": fix}
    raise BackendNotSupportedError(not_supported_message(name, request, reasons, **kw))


def attention_request(config: ModelConfig, device: torch.device | str, *,
                      requires_grad: bool = True,
                      dtype: torch.dtype = torch.float32) -> AttentionRequest:
    """The request a model built from ``config`` makes when trained (or run) on ``device``;
    ``dtype``: what q, k, v are (under autocast, its dtype)."""
    device = device if isinstance(device, str) else device.type
    return AttentionRequest(device=device, dtype=dtype, head_dim=config.head_dim,
                            q_len=config.block_size, k_len=config.block_size, causal=True,
                            dropout_p=config.dropout, requires_grad=requires_grad)


def attention_workload(config: ModelConfig, batch_size: int) -> Workload:
    """The batch and heads of the attention calls of a model built from ``config``."""
    return Workload(batch=batch_size, heads=config.n_head)


def select_layer_kernels(reg: Registry, name: str, request: KernelRequest, *,
                         prefer: str | None = None) -> LayerKernels:
    """A prepared instance of the layer kernels called ``name`` (``auto``: ``prefer`` if it
    runs, else the highest priority that fits and prepares). A named one that cannot run is an
    error with its reasons."""
    rows = backend_table(reg, request, kind="layer_kernels")
    if prefer is not None:  # keep a resumed run on the kernels it was trained with
        rows.sort(key=lambda r: r[0].name != prefer)
    if name == AUTO:
        for i, (cls, reasons) in enumerate(rows):
            if not reasons:
                try:
                    cls.prepare(request)
                except Exception as e:  # its kernels failed to build: move on
                    log.warning("layer kernels %r skipped by auto: %s", cls.name,
                                _prepare_failure(e))
                    rows[i] = (cls, [_prepare_failure(e)])
                else:
                    return cls()
        lines = [f"  {cls.name}: {'; '.join(r)}" for cls, r in rows] or ["  (none registered)"]
        raise BackendNotSupportedError("no layer kernels can run this request\n"
                                       f"  request: {request.describe()}\n" + "\n".join(lines))
    cls = reg.layer_kernel(name)
    reasons = backend_reasons(cls, request)
    if not reasons:
        try:
            cls.prepare(request)
        except GptlabError:
            raise
        except Exception as e:
            reasons = [_prepare_failure(e)]
        else:
            return cls()
    raise BackendNotSupportedError(
        f"layer kernels {name!r} cannot run this request; pick another with --kernels (see "
        f"`gpt backends`)\n  request: {request.describe()}\n  {name}: {'; '.join(reasons)}")
