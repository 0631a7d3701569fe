"""Device names: parse ``--device`` values and say why a device cannot be used here."""

from __future__ import annotations

import torch

from gptlab.core.errors import DeviceError

AUTO = "auto"


#: The device types gptlab trains and samples on.
DEVICE_TYPES = ("cpu", "cuda", "mps")


def device_unavailable_reason(device_type: str) -> str | None:
    """Why gptlab cannot use devices of this type here (None if it can)."""
    if device_type not in DEVICE_TYPES:
        return f"gptlab runs on {', '.join(DEVICE_TYPES)}, not {device_type}"
    if device_type == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None:
            return f"torch {torch.__version__} has no CUDA support (a CPU-only build)"
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU"
    if device_type == "mps" and not torch.backends.mps.is_available():
        return "the mps device is not available here"
    return None


def parse_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (CUDA if torch sees a GPU), unchecked."""
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None


def resolve_device(name: str | torch.device) -> torch.device:
    """Parse a device and check that torch can use it here; else DeviceError naming the fix."""
    dev = name if isinstance(name, torch.device) else parse_device(name)
    why = device_unavailable_reason(dev.type)
    if why:
        raise DeviceError(f"device {dev.type!r} is not available: {why}; use --device cpu")
    return dev


def device_type(name: str) -> str:
    """The device type a ``--device`` value names (``auto`` resolved), without checking it."""
    return parse_device(name).type
