"""Choosing an implementation: the one capability and selection mechanism of gptlab.

Every swappable implementation (an attention backend, the layer kernels, a fused decoder, and
whatever comes next) is an :class:`Implementation`: following xformers' fmha, it declares what it
supports as class constants (devices, dtypes, and its kind's own: head dims, dropout, ...) and
answers ``not_supported_reasons(request)`` in readable strings. :func:`select` serves a name and
``auto`` alike: a named implementation either fits the request or is a
:class:`~gptlab.core.errors.BackendNotSupportedError` showing the request and its reasons (never a
silent fallback); ``auto`` takes the highest priority that fits (or, given ``measure``, the
fastest measured among those that fit, :mod:`gptlab.core.autotune`), and when none fits the error
lists every candidate with its reasons. An implementation whose ``not_supported_reasons`` or
``prepare`` raises (a plugin's bug) has that error as its reason: ``auto`` moves on, a named one is
refused with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import ClassVar

import attrs
import torch

from gptlab.core.devices import AUTO, device_unavailable_reason
from gptlab.core.errors import BackendNotSupportedError, GptlabError

log = logging.getLogger(__name__)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@attrs.frozen(kw_only=True)
class Request:
    """What a caller will ask of an implementation: the device type and the dtype of the
    tensors; each kind of implementation adds its own fields."""

    device: str = "cpu"  # torch device type: "cpu", "cuda", ...
    dtype: torch.dtype = torch.float32

    def describe(self) -> str:
        """One line for errors and tables: ``device cpu, float32, ...``."""
        return f"device {self.device}, {dtype_name(self.dtype)}"


class Implementation:
    """A swappable implementation, chosen by name or by ``auto``.

    Subclasses set the capability constants; the default :meth:`not_supported_reasons` checks
    them, then the device's availability here and :meth:`unavailable_reasons` (a missing library
    or compiler). ``auto`` takes the highest :meth:`priority_for` among those with no reasons.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    priority: ClassVar[int] = 0  # auto takes the highest priority that fits
    #: A former name of the implementation called so: it runs when named, auto never takes it.
    alias_of: ClassVar[str | None] = None
    devices: ClassVar[frozenset[str]] = frozenset({"cpu"})
    dtypes: ClassVar[frozenset[torch.dtype]] = frozenset({torch.float32})

    @classmethod
    def unavailable_reasons(cls, device: str) -> list[str]:
        """Why it cannot run at all on ``device`` here (missing library, compiler...)."""
        return []

    @classmethod
    def not_supported_reasons(cls, request: Request) -> list[str]:
        """Readable reasons why ``request`` cannot be served; empty means supported."""
        r = []
        if request.device not in cls.devices:
            r.append(f"device {request.device!r} not supported (supports: "
                     f"{', '.join(sorted(cls.devices))})")
        if request.dtype not in cls.dtypes:
            names = ", ".join(sorted(dtype_name(d) for d in cls.dtypes))
            r.append(f"dtype {dtype_name(request.dtype)} not supported (supports: {names})")
        if request.device in cls.devices:
            missing = device_unavailable_reason(request.device)
            if missing:
                r.append(missing)
            r.extend(cls.unavailable_reasons(request.device))
        return r

    @classmethod
    def priority_for(cls, request: Request) -> int:
        """``auto``'s priority for this request (by default :attr:`priority`)."""
        return cls.priority

    @classmethod
    def priority_note(cls, request: Request) -> str:
        """Why :meth:`priority_for` gives ``request`` another priority than usual (shown by
        ``gpt backends``), or ``""``."""
        return ""

    @classmethod
    def prepare(cls, request: Request) -> None:
        """Called before construction, for a request it supports: build or load what the
        request's device needs. A GptlabError here makes ``auto`` move on."""

    @classmethod
    def measure_tag(cls, request: Request) -> str:
        """What, besides gptlab's version, decides its speed for ``request`` (e.g. the build of
        its kernels): ``auto``'s measurements are remembered per tag."""
        return ""


# --------------------------------------------------------------------------- selection
def reasons_of(cls: type[Implementation], request: Request) -> list[str]:
    """``cls.not_supported_reasons(request)``; if that raises (a plugin's bug), the error is the
    one reason, so a broken implementation is reported and passed over."""
    try:
        return list(cls.not_supported_reasons(request))
    except Exception as e:
        return [f"not_supported_reasons() raised {type(e).__name__}: {e}"]


def priority_of(cls: type[Implementation], request: Request) -> int:
    """``cls.priority_for(request)``; a plugin whose method raises keeps its plain ``priority``
    (its reasons will say what is wrong, if anything)."""
    try:
        return int(cls.priority_for(request))
    except Exception:
        return int(getattr(cls, "priority", 0))


def priority_note_of(cls: type[Implementation], request: Request) -> str:
    """``cls.priority_note(request)``; ``""`` for a plugin without one or whose method raises."""
    try:
        return str(getattr(cls, "priority_note", lambda _: "")(request) or "")
    except Exception:
        return ""


def candidates(reg, kind: str, request: Request) -> list[tuple[type, list[str]]]:
    """Every registered implementation of ``kind`` (a registry table: ``attention_backends``,
    ``layer_kernels``, ``decoders``) with its reasons for ``request``, highest priority first."""
    rows = [(cls, reasons_of(cls, request)) for cls in getattr(reg, kind).values()]
    return sorted(rows, key=lambda r: (-priority_of(r[0], request), r[0].name))


def _prepare(cls: type[Implementation], request: Request) -> str | None:
    """None if ``cls.prepare(request)`` succeeds, else why (a gptlab error's own message, a
    plugin's bug as such)."""
    try:
        cls.prepare(request)
    except GptlabError as e:
        return str(e)
    except Exception as e:
        return f"prepare() raised {type(e).__name__}: {e}"
    return None


def not_supported_message(label: str, name: str, request: Request, reasons: list[str],
                          fix: str) -> str:
    """The error for a named implementation that cannot serve ``request``: a first line that
    says so and how to go on, then the request and the reasons (as xformers' fmha does)."""
    return (f"{label} {name!r} cannot run this request; {fix}\n"
            f"  request: {request.describe()}\n"
            f"  {name}: {'; '.join(reasons)}")


def select(reg, kind: str, name: str, request: Request, *, prefer: str | None = None,
           measure: Callable[[Sequence[type]], type] | None = None, fix: str | None = None,
           required: bool = True) -> type | None:
    """The ``kind`` implementation called ``name``, or ``auto``'s choice, prepared for
    ``request`` (a class: the caller builds it).

    ``auto``: ``prefer`` (a resumed run's choice) if it fits; else, with ``measure`` (given the
    classes that fit and prepared, highest priority first, it returns one), the measured choice;
    else the highest priority that fits and prepares; if none fits, an error listing every
    candidate's reasons, or None when not ``required``. ``fix``: what the error for a named
    implementation that cannot run tells the user to do (default: pick another with the flag).
    """
    info = reg.kind(kind)
    if name != AUTO:
        cls = reg.get(kind, name)
        reasons = reasons_of(cls, request)
        if not reasons:
            try:
                cls.prepare(request)
            except GptlabError:
                raise  # its own message (e.g. how to build its kernels)
            except Exception as e:
                reasons = [f"prepare() raised {type(e).__name__}: {e}"]
            else:
                return cls
        fix = fix or f"pick another with {info.flag} (see `gpt backends`)"
        raise BackendNotSupportedError(not_supported_message(info.label, name, request, reasons,
                                                             fix))
    rows = candidates(reg, kind, request)
    if prefer is not None:  # keep a resumed run on what it was trained with
        rows.sort(key=lambda r: r[0].name != prefer)
    ready = []
    for i, (cls, reasons) in enumerate(rows):
        if reasons or cls.alias_of:
            continue
        failure = _prepare(cls, request)
        if failure:  # its kernels failed to build, a plugin's bug: move on
            log.warning("%s %r skipped by auto: %s", info.label, cls.name, failure)
            rows[i] = (cls, [failure])
        elif prefer is not None or measure is None:
            return cls
        else:
            ready.append(cls)
    if ready:
        return measure(ready)
    if not required:
        return None
    lines = [f"  {cls.name}: {'; '.join(r)}" for cls, r in rows] or ["  (none registered)"]
    fix = f"; {info.auto_fix}" if info.auto_fix else ""
    raise BackendNotSupportedError(f"no {info.label} can run this request{fix}\n"
                                   f"  request: {request.describe()}\n" + "\n".join(lines))
