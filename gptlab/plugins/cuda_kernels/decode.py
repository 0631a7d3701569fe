"""The fused decoding step: generation with the KV cache runs each block of a GPT-2 model for the
new token in one C call (``csrc/cpu/decode.c``) instead of ~20 torch calls and 4 kernel calls.

Decoding one token is b rows of work per block: op by op, every call's fixed cost (Python,
the dispatcher, allocating outputs: tens of microseconds each on a 2-core CPU) outweighs its
arithmetic, so the cached path ran only ~3x faster than recomputing the whole window. The fused
step reads each weight once (matrix-vector products, bound by memory bandwidth), writes the new
keys and values straight into the cache's storage and attends with the flash kernel's decoding
path.

It serves exactly the parts it computes: pre-norm blocks of :class:`gptlab.nn.LayerNorm`,
:class:`gptlab.nn.MultiHeadAttention` with nothing at the position seam (learned positions are
added before the blocks) and the GELU :class:`gptlab.nn.MLP`, the ``flash`` backend on the native
kernels, float32 on the CPU, in inference. :func:`fused_decode_reasons` says why any other model
decodes op by op (its own modules, unchanged). The module path is the reference:
tests/test_fused_decode.py checks the logits against it, and greedy generation against
generation without the cache.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gptlab.plugins.cuda_kernels.loader import NativeLibrary, load
from gptlab.plugins.cuda_kernels.ops import _threads

#: The order of a block's parameters in the C call (see gptlab_kernels.h).
_PARAMS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
           "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
           "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


def fused_decode_reasons(model: nn.Module) -> list[str]:
    """Why the fused step cannot decode ``model`` (empty: it can)."""
    from gptlab.nn import MLP, LayerNorm, MultiHeadAttention, PreNormBlock
    from gptlab.plugins.cuda_kernels.backends import FlashAttention

    blocks = getattr(model, "blocks", None)
    if not blocks:
        return ["the model has no transformer blocks"]
    r = []
    if type(getattr(model, "attention_backend", None)) is not FlashAttention:
        r.append("attention is not the flash backend on the native kernels")
    for i, b in enumerate(blocks):
        if type(b) is not PreNormBlock:
            r.append(f"block {i} is {type(b).__name__}, not PreNormBlock")
            break
        if type(b.ln_1) is not LayerNorm or type(b.ln_2) is not LayerNorm:
            r.append(f"block {i}'s norm is {type(b.ln_1).__name__}, not LayerNorm")
        if type(b.attn) is not MultiHeadAttention or b.attn.qk_positions is not None:
            r.append(f"block {i}'s attention has a module at the position seam (rotary, "
                     f"QK-norm) or is not MultiHeadAttention")
        if type(b.mlp) is not MLP:
            r.append(f"block {i}'s MLP is {type(b.mlp).__name__}, not the GELU MLP")
        if r:
            break
    for name, p in model.named_parameters():
        if p.device.type != "cpu" or p.dtype != torch.float32:
            r.append(f"{name} is {str(p.dtype).replace('torch.', '')} on {p.device}, not "
                     f"float32 on the CPU")
            break
    return r


class FusedDecoder:
    """Runs every block of ``model`` for one new token per sequence, one C call per block.

    Made per generation window (:meth:`gptlab.plugins.models.transformer.Transformer.new_cache`),
    so the parameters' addresses are taken once per window; it keeps the parameters alive.
    """

    def __init__(self, model: nn.Module, lib: NativeLibrary | None = None):
        self.lib = lib or load("cpu")
        self.model = model
        self.c, self.nh = model.config.n_embd, model.config.n_head
        self.eps = model.blocks[0].ln_1.eps
        ffi = self.lib.ffi
        self.tensors = []  # what the pointers point into
        self.params = []  # per block: a float *[12] for the C call
        for block in model.blocks:
            named = dict(block.named_parameters())
            ts = [named.get(n) for n in _PARAMS]
            ts = [None if t is None else t.detach().contiguous() for t in ts]
            self.tensors.append(ts)
            self.params.append(ffi.new("float *[]", [self.lib.ptr(t) for t in ts]))
        self._ws = None

    def usable(self) -> bool:
        """In inference only: a step with gradients, or in training mode, goes op by op."""
        return not self.model.training and not (
            torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters()))

    def __call__(self, x: torch.Tensor, cache) -> torch.Tensor | None:
        """x (B, 1, C), the new token's embeddings; returns the blocks' output (B, 1, C) with
        the token's keys and values appended to ``cache``, or None where the step cannot run
        here (the caller then runs the blocks one by one)."""
        if x.dim() != 3 or x.size(1) != 1 or x.dtype != torch.float32 or not self.usable():
            return None
        B, _, C = x.shape
        hs = C // self.nh
        x = x.reshape(B, C).clone()  # the residual stream, updated in place by each block
        lib = self.lib
        if self._ws is None or self._ws[0] != B:
            nbytes = lib.lib.gptlab_decode_block_workspace_size(B, C, self.nh)
            self._ws = (B, x.new_empty(-(-nbytes // 4)))
        ws = lib.ptr(self._ws[1], "void *")
        xp = lib.ptr(x)
        threads = _threads(12 * C * C * B)  # a block's multiply-adds: one thread below ~1M
        for params, layer in zip(self.params, cache.layers):
            k, v = layer.storage(B, self.nh, hs, x)  # (B, nh, capacity, hs), room for one more
            lib.call("gptlab_decode_block_f32", xp, lib.ptr(k), lib.ptr(v), ws, params, B, C,
                     self.nh, layer.length, k.size(2), self.eps, threads)
            layer.length += 1
        return x.view(B, 1, C)
