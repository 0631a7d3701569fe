"""Layer kernels: which implementation computes LayerNorm, bias + GELU and the loss.

The transformer's non-attention operations, chosen by name like attention backends
(:mod:`gptlab.core.attention`): each implementation declares its devices and dtypes, answers
``not_supported_reasons(request)``, may ``prepare(request)`` (build its kernels), and is
registered through the ``register_layer_kernels`` hook. ``torch`` (the hand-written PyTorch of
:mod:`gptlab.nn.layers`: the teaching reference and the fallback) and ``native`` (the C/CUDA
kernels of :mod:`gptlab.plugins.cuda_kernels`: one pass per row, Ba et al. 2016 LayerNorm,
GELU of Hendrycks & Gimpel 2016, a softmax cross-entropy that writes its gradient in the same
pass) are built in. ``--kernels auto`` takes the highest priority that can run.

A model asks for them through :func:`set_layer_kernels`, which installs one implementation in
every :class:`gptlab.nn.LayerNorm` and :class:`gptlab.nn.MLP` of a model and in the model's
loss; a module with none installed computes the PyTorch formula.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
import torch.nn as nn
import torch.nn.functional as F


@attrs.frozen
class KernelRequest:
    """What a model will ask of its layer kernels; used for dispatch."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32  # of the activations (the autocast dtype, if any)

    def describe(self) -> str:
        return f"device {self.device}, {str(self.dtype).replace('torch.', '')}"


class LayerKernels:
    """An implementation of the layer operations. Subclasses set the class attributes and
    override the three operations; the defaults here are the PyTorch formulas."""

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    priority: ClassVar[int] = 0  # auto picks the highest priority that fits
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda"})
    dtypes: ClassVar[frozenset[torch.dtype]] = frozenset({torch.float32, torch.bfloat16,
                                                         torch.float16})

    @classmethod
    def unavailable_reasons(cls, device: str) -> list[str]:
        """Why the implementation cannot run at all on ``device`` here."""
        return []

    @classmethod
    def not_supported_reasons(cls, request: KernelRequest) -> list[str]:
        """Readable reasons why ``request`` cannot be served; empty means supported."""
        r = []
        if request.device not in cls.devices:
            r.append(f"device {request.device!r} not supported (supports: "
                     f"{', '.join(sorted(cls.devices))})")
        if request.dtype not in cls.dtypes:
            r.append(f"dtype {str(request.dtype).replace('torch.', '')} not supported")
        if not r:
            r.extend(cls.unavailable_reasons(request.device))
        return r

    @classmethod
    def priority_for(cls, request: KernelRequest) -> int:
        """``auto``'s priority for this request (by default :attr:`priority`)."""
        return cls.priority

    @classmethod
    def prepare(cls, request: KernelRequest) -> None:
        """Build or load what the request's device needs; a GptlabError makes auto move on."""

    # ---- the operations ------------------------------------------------------------------
    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
        """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dim (biased var)."""
        from gptlab.nn.layers import layer_norm

        return layer_norm(x, weight, bias, eps)

    def linear_gelu(self, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        """``gelu(linear(x))``, GELU in its erf form."""
        return F.gelu(linear(x))

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of ``logits`` (N, V) against ``targets`` (N,)."""
        return F.cross_entropy(logits, targets)

    def decoder(self, model: nn.Module):
        """A fused decoding step for ``model``'s blocks, or None (the default): the blocks then
        decode op by op. When not None, ``decoder(x, cache)`` takes the new token's embeddings
        (B, 1, C) and a :class:`~gptlab.plugins.models.transformer.KVCache`, runs every block
        (appending to the cache) and returns (B, 1, C), or returns None to decline that step."""
        return None


class TorchKernels(LayerKernels):
    name = "torch"
    priority = 10
    description = "hand-written PyTorch (the reference): LayerNorm in 7 ops, F.gelu, " \
                  "F.cross_entropy"


def set_layer_kernels(model: nn.Module, kernels: LayerKernels | None) -> int:
    """Install ``kernels`` in every :class:`gptlab.nn.LayerNorm` and :class:`gptlab.nn.MLP` of
    ``model`` and in the model itself (its loss); ``None`` restores the PyTorch formulas.
    Returns how many modules now use them."""
    from gptlab.nn.layers import MLP, LayerNorm

    count = 0
    for m in model.modules():
        if isinstance(m, (LayerNorm, MLP)):
            m.kernels = kernels
            count += 1
    model.layer_kernels = kernels
    return count
