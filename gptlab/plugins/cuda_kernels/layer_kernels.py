"""The ``native`` layer kernels: LayerNorm, bias + GELU and the cross-entropy loss computed by
the C (CPU) and CUDA kernels of this package (``csrc/*/layernorm.*``, ``bias_gelu.*``,
``cross_entropy.*``) through the torch ops of :mod:`.ops`.

The kernels compute in float32. Under ``--dtype bfloat16`` the matrix products give bfloat16
activations: the bias + GELU kernel takes them on the CPU (widened, result rounded back), the
loss widens bfloat16 logits to float32 first (as autocast does for ``F.cross_entropy``), and the
residual stream LayerNorm reads stays float32.

Their emulated twin, which runs the ``.cu`` kernels on CPU tensors, is a verification tool
(:class:`gptlab.verify.emulated.EmulatedNativeKernels`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from gptlab.nn import TorchKernels
from gptlab.nn.linear import product
from gptlab.plugins.cuda_kernels import build, ops
from gptlab.plugins.cuda_kernels.backends import (build_tag, cuda_dtype_reasons,
                                                  native_unavailable_reasons)
from gptlab.plugins.cuda_kernels.loader import load


class NativeKernels(TorchKernels):
    name = "native"
    priority = 60  # on the CPU: measured faster than torch's (`gpt bench ops`)
    description = "C/CUDA kernels: one-pass LayerNorm, fused bias+GELU, one-pass cross-entropy"
    devices = frozenset({"cpu", "cuda"})
    dtypes = frozenset({torch.float32, torch.bfloat16})
    flavour: ClassVar[str] = ops.NATIVE  # or an emulated flavour, e.g. "cuda-emu"

    #: On CUDA: below torch's (10). The CUDA kernels are verified on the emulator only and have
    #: never run on a GPU, so ``--kernels auto`` keeps torch's until ``gpt kernels gpucheck``
    #: has checked and measured them there; ``--kernels native`` still runs them.
    CUDA_PRIORITY = 5

    @classmethod
    def priority_for(cls, request):
        if request.device == "cuda" and cls.flavour == ops.NATIVE:
            return cls.CUDA_PRIORITY
        return cls.priority

    @classmethod
    def priority_note(cls, request):
        if request.device == "cuda" and cls.flavour == ops.NATIVE:
            return (f"below torch ({TorchKernels.priority}) on cuda: never run on a GPU yet; "
                    f"`gpt kernels gpucheck` measures them, `--kernels native` runs them")
        return ""

    @classmethod
    def unavailable_reasons(cls, device: str) -> list[str]:
        if cls.flavour != ops.NATIVE:
            return [r for r in [build.missing_compiler_reason(cls.flavour)] if r]
        return native_unavailable_reasons(device)

    @classmethod
    def not_supported_reasons(cls, request):
        return super().not_supported_reasons(request) + cuda_dtype_reasons(request, cls.dtypes)

    @classmethod
    def _build_flavour(cls, device: str) -> str:
        return ops.native_flavour(device) if cls.flavour == ops.NATIVE else cls.flavour

    @classmethod
    def prepare(cls, request):
        load(cls._build_flavour(request.device))

    @classmethod
    def measure_tag(cls, request):
        return build_tag(cls._build_flavour(request.device))

    def layer_norm(self, x, weight, bias, eps):
        if x.dtype != weight.dtype:  # autocast activations: normalise as the reference does
            return super().layer_norm(x, weight, bias, eps)
        return ops.layer_norm(x, weight, bias, eps, self.flavour)[0]

    def linear_gelu(self, x, linear):
        if linear.bias is None:
            return F.gelu(linear(x))
        h = product(linear, x)  # (..., 4C); the bias is added by the kernel
        return ops.bias_gelu(h, linear.bias.to(h.dtype), self.flavour)

    def cross_entropy(self, logits, targets):
        return ops.cross_entropy(logits.float(), targets, self.flavour)
