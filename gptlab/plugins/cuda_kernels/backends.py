"""The ``fused`` and ``flash`` attention backends over the native kernels (CPU and CUDA).

``fused``: torch matmuls around one fused scale + causal mask + softmax kernel (and its backward
``dx = scale * p * (dp - rowsum(p * dp))``); it still stores the (T, T) probabilities.
``flash``: FlashAttention (Dao et al. 2022; Dao 2023) forward with the online softmax and the
memory-efficient backward that recomputes P from Q, K and the saved logsumexp: extra memory is
O(T), never O(T^2).

Both run CPU tensors on the C kernels and CUDA tensors on the nvcc-built ``.cu`` kernels; each
library is compiled on first use (see :mod:`.build`). ``flash`` names the algorithm: on CUDA in
bfloat16 and float16 it runs FlashAttention-2 on tensor cores (``csrc/cuda/flash_tc.cu``), and
``flash-tc``, that path's former name, stays as an alias. Their emulated twins, which run the
``.cu`` kernels on CPU tensors, are verification tools (:mod:`gptlab.verify.emulated`).
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch

from gptlab import AttentionBackend
from gptlab.core.errors import GptlabError
from gptlab.nn import default_scale
from gptlab.plugins.cuda_kernels import build, ops
from gptlab.plugins.cuda_kernels.loader import KernelError, NativeLibrary, load

#: The CUDA kernels keep ceil(head_dim / 32) <= 4 values per lane in registers.
CUDA_MAX_HEAD_DIM = 128


def cuda_unavailable_reasons() -> tuple[str, ...]:
    """Why the CUDA kernels cannot run here (empty when they can).

    First, whether the driver can run nvcc's CUDA runtime at all
    (:func:`.build.cuda_version_mismatch`: one line naming both versions). Then asks the nvcc
    library's runtime for GPUs (cudart is linked statically, so the library loads
    without a driver). Where torch itself can use CUDA the library is built for that if needed;
    where torch cannot (torch's reason is reported anyway), only an already built library is
    asked, so explaining costs no nvcc build. Cached per compiler and cache folder.
    """
    return _cuda_reasons(build.CUDA.compiler(), str(build.cache_root()),
                         torch.cuda.is_available())


@functools.cache
def _cuda_reasons(compiler: str, cache: str, torch_has_cuda: bool) -> tuple[str, ...]:
    missing = build.missing_compiler_reason(build.CUDA)
    if missing:
        return (missing,)
    mismatch = build.cuda_version_mismatch()
    if mismatch:
        return (mismatch,)
    try:
        if torch_has_cuda:
            lib = load("cuda")
        else:
            path = build.cached_library(build.CUDA)
            if path is None:
                return ()
            lib = NativeLibrary(path)
    except GptlabError as e:
        return (str(e),)
    count, why = lib.cuda_device_count()
    if why:
        return (f"the CUDA kernels (nvcc, sm_80/sm_90) find no usable GPU: {why}",)
    if count == 0:
        return ("the CUDA kernels (nvcc, sm_80/sm_90) find no GPU",)
    return ()


def native_unavailable_reasons(device: str) -> list[str]:
    """Why the native (not emulated) kernels cannot run on ``device`` here."""
    if device == "cpu":
        return [r for r in [build.missing_compiler_reason(build.CPU)] if r]
    if device == "cuda":
        return list(cuda_unavailable_reasons())
    return []


def build_tag(flavour: str) -> str:
    """The ``measure_tag`` of an implementation on the ``flavour`` kernels: the build that was
    timed (``auto`` remembers a measurement per build, so new kernels are timed anew)."""
    return f"@{build.build_key(build.get_flavour(flavour))[:12]}"


def cuda_dtype_reasons(request, dtypes) -> list[str]:
    """The CUDA kernels take float32 only, though ``dtypes`` (the CPU's) has more."""
    if request.device == "cuda" and request.dtype != torch.float32 and request.dtype in dtypes:
        return [f"dtype {str(request.dtype).replace('torch.', '')} not supported by the CUDA "
                f"kernels (float32 only)"]
    return []


class NativeBackend(AttentionBackend):
    devices = frozenset({"cpu", "cuda"})
    dtypes = frozenset({torch.float32, torch.bfloat16})  # bfloat16: the C kernels only
    min_head_dim = 1
    max_head_dim = 256  # the C kernels; CUDA_MAX_HEAD_DIM on cuda
    supports_backward = True
    supports_dropout = False
    supports_q_shorter_than_k = True
    deterministic = True
    flavour: ClassVar[str] = ops.NATIVE  # or an emulated flavour, e.g. "cuda-emu"

    @classmethod
    def unavailable_reasons(cls, device: str) -> list[str]:
        if cls.flavour != ops.NATIVE:
            return [r for r in [build.missing_compiler_reason(cls.flavour)] if r]
        return native_unavailable_reasons(device)

    @classmethod
    def not_supported_reasons(cls, request):
        r = super().not_supported_reasons(request)
        if request.device == "cuda" and request.head_dim > CUDA_MAX_HEAD_DIM:
            r.append(f"head_dim {request.head_dim} > {CUDA_MAX_HEAD_DIM} not supported by the "
                     f"CUDA kernels")
        return r + cuda_dtype_reasons(request, cls.dtypes)

    @classmethod
    def _build_flavour(cls, device: str) -> str:
        return ops.native_flavour(device) if cls.flavour == ops.NATIVE else cls.flavour

    @classmethod
    def prepare(cls, request):
        # compile the library the request's device needs now: a failure is a one-line
        # KernelBuildError, and auto moves on to the next backend
        load(cls._build_flavour(request.device))

    @classmethod
    def measure_tag(cls, request):
        return build_tag(cls._build_flavour(request.device))

    def _check_dropout(self, dropout_p):
        if dropout_p:
            raise KernelError(f"the {self.name} backend does not support attention dropout "
                              f"(got p={dropout_p}); use --dropout 0 or --attention naive")


class FusedAttention(NativeBackend):
    name = "fused"
    priority = 20
    description = "torch matmuls around a fused scale+mask+softmax kernel (stores T x T)"

    def forward(self, q, k, v, *, causal=True, dropout_p=0.0, scale=None):
        self._check_dropout(dropout_p)
        scale = default_scale(q.size(-1), scale)
        att = q @ k.transpose(-2, -1)  # (B, nh, Tq, Tk), unscaled: the kernel scales
        p = torch.ops.gptlab.fused_softmax(att, scale, causal, self.flavour)
        return p @ v  # (B, nh, Tq, hs)


class FlashAttention(NativeBackend):
    """FlashAttention-2 (Dao 2023), the algorithm, whatever kernel serves the request: the C
    kernels on the CPU (float32; bfloat16 widened to float32 and rounded back); on CUDA the
    float32 kernels (``flash.cu``) in float32 and the tensor-core kernels (``flash_tc.cu``:
    ``mma.sync``, sm_80+) in bfloat16 and float16, head dims 64 and 128."""

    name = "flash"
    priority = 60  # above sdpa on the CPU: 2x faster at T >= 256 (`gpt bench attention`)
    description = ("FlashAttention-2, O(T) memory: C kernels on the CPU (float32; bfloat16 "
                   "widened); on CUDA float32 kernels, tensor cores in bfloat16/float16")
    dtypes = frozenset({torch.float32, torch.bfloat16, torch.float16})
    stores_scores = False  # O(T) memory

    #: On CUDA: below sdpa (50), never measured on a GPU. The float32 kernel is scalar (on
    #: paper, SASS: 4-8x slower than sdpa on an H100); the tensor-core one was verified on the
    #: emulator only.
    CUDA_PRIORITY, TENSOR_CORE_PRIORITY = 40, 45

    @classmethod
    def tensor_cores(cls, device: str, dtype: torch.dtype) -> bool:
        """Whether the tensor-core kernels serve ``dtype`` on ``device`` (CUDA's, or the
        emulated CUDA of an emulated flavour)."""
        return dtype in ops.TC_DTYPES and (device == "cuda" or cls.flavour != ops.NATIVE)

    @classmethod
    def not_supported_reasons(cls, request):
        r = AttentionBackend.not_supported_reasons.__func__(cls, request)  # the constants
        d = request.head_dim
        if not cls.min_head_dim <= d <= cls.max_head_dim:
            return r  # said already
        if cls.tensor_cores(request.device, request.dtype):
            if d not in ops.TC_HEAD_DIMS:
                r.append(f"head_dim {d} not supported by the tensor-core kernels (64 or 128)")
        elif request.device == "cuda" or cls.flavour != ops.NATIVE:
            if d > CUDA_MAX_HEAD_DIM:
                r.append(f"head_dim {d} > {CUDA_MAX_HEAD_DIM} not supported by the CUDA kernels")
        elif request.dtype == torch.float16:
            r.append("dtype float16 not supported by the C kernels (float32, bfloat16)")
        return r

    @classmethod
    def priority_for(cls, request):
        if request.device != "cuda":
            return cls.priority
        if cls.tensor_cores(request.device, request.dtype):
            return cls.TENSOR_CORE_PRIORITY
        return cls.CUDA_PRIORITY

    @classmethod
    def is_deterministic(cls, device: str) -> bool:
        return device == "cpu"  # on a GPU, dQ is summed with atomics in varying order

    def forward(self, q, k, v, *, causal=True, dropout_p=0.0, scale=None):
        self._check_dropout(dropout_p)
        scale = default_scale(q.size(-1), scale)
        if self.tensor_cores(q.device.type, q.dtype):
            o, _ = torch.ops.gptlab.flash_attn_tc(q, k, v, scale, causal, self.flavour)
            return o
        return ops.flash_attention(q, k, v, scale, causal, self.flavour)


class TensorCoreFlash(FlashAttention):
    """``flash-tc``: what ``flash`` in bfloat16 or float16 on CUDA was called before ``flash``
    named the algorithm; the same kernels, kept as a name."""

    name = "flash-tc"
    alias_of = "flash"
    devices = frozenset({"cuda"})
    dtypes = frozenset(ops.TC_DTYPES)
    description = "alias of flash in bfloat16/float16 on CUDA (the tensor-core kernels)"

    @classmethod
    def is_deterministic(cls, device: str) -> bool:
        return False  # dQ is summed with atomics in varying order (the emulator repeats exactly)
