"""The CUDA kernels on CPU tensors: emulated twins of the native attention backends and layer
kernels, whose ``.cu`` kernels run by the CUDA emulator (flavour ``cuda-emu``; :func:`on_flavour`
makes a twin of one on another emulated flavour, such as ``cuda-emu-numerics``).

Each declares what the GPU kernel it stands for supports (float32, head dims up to 128; the
tensor-core flash: bfloat16 or float16, head dims 64 and 128) and the ``cpu`` device. None is
registered: the emulator is ~100x slower than the C kernels and auto must never pick them. They
verify the CUDA code in the test suite, in ``gpt kernels check --flavour cuda-emu`` and in
``gpt kernels gpucheck --emulate``.
"""

from __future__ import annotations

import torch

from gptlab.plugins.cuda_kernels import build
from gptlab.plugins.cuda_kernels.backends import (CUDA_MAX_HEAD_DIM, FlashAttention,
                                                  FusedAttention, TensorCoreFlash)
from gptlab.plugins.cuda_kernels.layer_kernels import NativeKernels


class Emulated:
    """Mixin: the CUDA kernels run on CPU tensors by the emulator; never picked by auto."""

    priority = -100
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.float32})
    max_head_dim = CUDA_MAX_HEAD_DIM
    flavour = build.CUDA_EMU.name


class EmulatedFused(Emulated, FusedAttention):
    name = "fused-emu"
    description = "the CUDA fused softmax (softmax.cu) run on the CPU by the CUDA emulator"


class EmulatedFlash(Emulated, FlashAttention):
    name = "flash-emu"
    description = ("the CUDA flash attention run on the CPU by the CUDA emulator: flash.cu in "
                   "float32, flash_tc.cu (tensor cores) in bfloat16 and float16")
    dtypes = FlashAttention.dtypes

    @classmethod
    def is_deterministic(cls, device: str) -> bool:
        return False  # as on the GPU it stands for (the emulator itself repeats exactly)


class EmulatedTensorCoreFlash(Emulated, TensorCoreFlash):
    name = "flash-tc-emu"
    alias_of = "flash-emu"
    description = ("the tensor-core flash attention (flash_tc.cu) run on the CPU by the CUDA "
                   "emulator (flash-emu in bfloat16 and float16)")
    dtypes = TensorCoreFlash.dtypes


class EmulatedNativeKernels(NativeKernels):
    """The CUDA layer kernels (layernorm.cu, bias_gelu.cu, cross_entropy.cu) on CPU tensors, run
    by the CUDA emulator; never picked by auto."""

    name = "native-emu"
    priority = -100
    description = "the CUDA layer kernels run on the CPU by the CUDA emulator"
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.float32})
    flavour = build.CUDA_EMU.name


def on_flavour(cls: type, flavour: str) -> type:
    """The emulated class ``cls`` with its kernels from another emulated flavour (e.g.
    ``cuda-emu-numerics``), named ``<name>[<flavour>]``; gpucheck's emulated target keeps to
    ``cuda-emu``."""
    build.get_flavour(flavour)  # an unknown name is a one-line error here
    return type(f"{cls.__name__}_{flavour.replace('-', '_')}", (cls,),
                {"flavour": flavour, "name": f"{cls.name}[{flavour}]", "__module__": __name__})
