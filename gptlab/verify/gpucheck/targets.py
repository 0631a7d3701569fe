"""What gpucheck checks: the plugin's CUDA attention backends and layer kernels on the GPU, or
their emulated twins on CPU tensors, found by class so that one added later is checked too."""

from __future__ import annotations

import attrs

from gptlab.core.errors import DeviceError

#: The package whose registered CUDA backends and layer kernels are checked.
PACKAGE = "gptlab.plugins.cuda_kernels"
#: The package of their emulated twins (``--emulate``).
EMULATED_PACKAGE = "gptlab.verify"


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtypes_of(cls) -> list:
    """The dtypes a backend or layer kernels class declares, float32 first."""
    import torch

    return sorted(cls.dtypes, key=lambda d: (d != torch.float32, dtype_name(d)))


def _ours(cls, package: str = PACKAGE) -> bool:
    return cls.__module__ == package or cls.__module__.startswith(package + ".")


def _subclasses(base) -> list[type]:
    out, todo = [], [base]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in out:
                out.append(sub)
                todo.append(sub)
    return out


@attrs.frozen
class Target:
    """Where the checked kernels run: ``cuda`` (the nvcc library on the GPU) or, emulated, the
    ``.cu`` kernels on CPU tensors through the emulator. ``attention`` and ``layer_kernels`` are
    the classes checked; ``baseline`` is sdpa."""

    device: str
    emulated: bool
    attention: tuple[type, ...]
    layer_kernels: tuple[type, ...]
    baseline: type

    def attention_request(self, dtype, *, D: int = 64, T: int = 128, causal: bool = True):
        from gptlab.core.attention import AttentionRequest

        return AttentionRequest(device=self.device, dtype=dtype, head_dim=D, q_len=T, k_len=T,
                                causal=causal)

    def kernel_request(self, dtype):
        from gptlab.core.layer_kernels import KernelRequest

        return KernelRequest(device=self.device, dtype=dtype)


def cuda_target(reg) -> Target:
    """Every attention backend and layer kernel registered from the plugin that declares
    ``cuda`` (a backend added to the plugin is found here), aliases (``flash-tc``) once, under
    the name they stand for."""
    attention = tuple(cls for _, cls in sorted(reg.attention_backends.items())
                      if _ours(cls) and "cuda" in cls.devices and not cls.alias_of)
    layer = tuple(cls for _, cls in sorted(reg.layer_kernels.items())
                  if _ours(cls) and "cuda" in cls.devices)
    return Target("cuda", False, attention, layer, reg.attention_backend("sdpa"))


def emulated_target(reg) -> Target:
    """The emulated twins (``*-emu``) of the plugin's CUDA kernels, on CPU tensors (flavour
    ``cuda-emu``: not their twins on other emulated flavours)."""
    from gptlab.plugins.cuda_kernels import build
    from gptlab.verify import emulated

    def chosen(c) -> bool:
        return (_ours(c, EMULATED_PACKAGE) and bool(getattr(c, "name", None))
                and c.flavour == build.CUDA_EMU.name)

    attention = tuple(sorted((c for c in _subclasses(emulated.Emulated)
                              if chosen(c) and not c.alias_of), key=lambda c: c.name))
    layer = tuple(sorted((c for c in [emulated.EmulatedNativeKernels,
                                      *_subclasses(emulated.EmulatedNativeKernels)]
                          if chosen(c)), key=lambda c: c.name))
    return Target("cpu", True, attention, layer, reg.attention_backend("sdpa"))


def require_gpu() -> None:
    """A typed one-line error where torch sees no CUDA GPU."""
    from gptlab.core.devices import device_unavailable_reason

    why = device_unavailable_reason("cuda")
    if why:
        raise DeviceError(f"no CUDA GPU visible to torch: {why}; run gpucheck on a GPU machine, "
                          f"or add --emulate for a rehearsal on the CPU with the emulated kernels")
