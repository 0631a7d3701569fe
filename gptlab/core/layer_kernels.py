"""Layer kernels: which implementation computes LayerNorm, bias + GELU and the loss.

The transformer's non-attention operations, chosen by name (``--kernels``) like attention
backends: an implementation is an :class:`~gptlab.core.selection.Implementation` registered
through the ``register_layer_kernels`` hook. ``torch`` (:class:`gptlab.nn.TorchKernels`, the
hand-written PyTorch of :mod:`gptlab.nn`: the teaching reference) and ``native`` (the
C/CUDA kernels of :mod:`gptlab.plugins.cuda_kernels`: one pass per row, Ba et al. 2016
LayerNorm, GELU of Hendrycks & Gimpel 2016, a softmax cross-entropy that writes its gradient in
the same pass) are built in. ``--kernels auto`` takes the highest priority that can run.

A model receives the chosen implementation with its other parts
(:class:`~gptlab.core.interfaces.Components`) and hands it to the modules it builds:
:class:`gptlab.nn.LayerNorm` and :class:`gptlab.nn.MLP` compute through it, and so does the
model's loss.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn as nn

from gptlab.core.selection import Implementation, Request


@attrs.frozen(kw_only=True)
class KernelRequest(Request):
    """What a model will ask of its layer kernels: the device, and the dtype of the
    activations (the autocast dtype, if any)."""


class LayerKernels(Implementation):
    """An implementation of the layer operations: subclasses set the capability constants and
    implement the three operations (:class:`gptlab.nn.TorchKernels` is the PyTorch formulas; a
    subclass of it may override only some)."""

    name = "base"
    devices = frozenset({"cpu", "cuda"})
    dtypes = frozenset({torch.float32, torch.bfloat16, torch.float16})

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
        """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dim (biased var)."""
        raise NotImplementedError

    def linear_gelu(self, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        """``gelu(linear(x))``, GELU in its erf form."""
        raise NotImplementedError

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of ``logits`` (N, V) against ``targets`` (N,)."""
        raise NotImplementedError
