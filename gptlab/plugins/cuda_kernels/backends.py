"""The ``fused`` and ``flash`` attention backends over the native CPU kernels.

``fused``: torch matmuls around one fused scale + causal mask + softmax kernel (and its backward
``dx = scale * p * (dp - rowsum(p * dp))``); it still stores the (T, T) probabilities.
``flash``: FlashAttention (Dao et al. 2022; Dao 2023) forward with the online softmax and the
memory-efficient backward that recomputes P from Q, K and the saved logsumexp: extra memory is
O(T), never O(T^2). The library is compiled on first use (see :mod:`.build`).
"""

from __future__ import annotations

import torch

from gptlab.core.interfaces import AttentionBackend, default_scale
from gptlab.plugins.cuda_kernels import build
from gptlab.plugins.cuda_kernels.loader import KernelError, load


class NativeCpuBackend(AttentionBackend):
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.float32})
    min_head_dim = 1
    max_head_dim = 256
    supports_backward = True
    supports_dropout = False
    supports_q_shorter_than_k = True
    deterministic = True

    @classmethod
    def unavailable_reasons(cls, device: str) -> list[str]:
        if device == "cpu" and build.find_compiler(build.CPU) is None:
            return [f"C compiler not found ({build.CPU.compiler()!r}; install gcc or set CC)"]
        return []

    def __init__(self):
        load("cpu")  # compile on first use; a failure is a one-line KernelBuildError

    def _check_dropout(self, dropout_p):
        if dropout_p:
            raise KernelError(f"the {self.name} backend does not support attention dropout "
                              f"(got p={dropout_p}); use --dropout 0 or --attention naive")


class FusedAttention(NativeCpuBackend):
    name = "fused"
    priority = 20
    description = "torch matmuls around a fused scale+mask+softmax C kernel (stores T x T)"

    def forward(self, q, k, v, *, causal=True, dropout_p=0.0, scale=None):
        self._check_dropout(dropout_p)
        scale = default_scale(q.size(-1), scale)
        att = q @ k.transpose(-2, -1)  # (B, nh, Tq, Tk), unscaled: the kernel scales
        p = torch.ops.gptlab.fused_softmax(att, scale, causal)
        return p @ v  # (B, nh, Tq, hs)


class FlashAttention(NativeCpuBackend):
    name = "flash"
    priority = 60  # above sdpa: 2x faster on the CPU at T >= 256 (`gpt bench attention`)
    description = "FlashAttention-2 in C: tiled online softmax, recomputing backward, O(T) memory"

    def forward(self, q, k, v, *, causal=True, dropout_p=0.0, scale=None):
        self._check_dropout(dropout_p)
        scale = default_scale(q.size(-1), scale)
        o, _ = torch.ops.gptlab.flash_attn(q, k, v, scale, causal)
        return o
