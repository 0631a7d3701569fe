"""The fused decoding step: generation with the KV cache runs the whole model for the new token in
one C call (``csrc/cpu/decode.c``) instead of ~100 calls, 17 of them kernel calls.

Decoding one token is b rows of work per block: op by op, every call's fixed cost (Python,
the dispatcher, allocating outputs: tens of microseconds each on a 2-core CPU) outweighs its
arithmetic, so the cached path ran only ~3x faster than recomputing the whole window. The fused
step reads each weight once (matrix-vector products, bound by memory bandwidth), writes the new
keys and values straight into the cache's storage and attends with the flash kernel's decoding
path.

It is a :class:`gptlab.Decoder` (the ``register_decoders`` hook), chosen when a model is built
if it serves exactly the parts the model is built from: the transformer with pre-norm blocks of
LayerNorm or RMSNorm, learned, rotary or no positions with or without QK-norm, the GELU or ReLU²
MLP (the default and speedrun presets' parts), the ``flash`` backend and the ``native`` layer
kernels, float32 on the CPU; it runs in inference only. ``FusedDecoder.not_supported_reasons``
says why any other model decodes op by op (its own modules, unchanged). The module path is the
reference: tests/test_fused_decode.py checks the logits against it, and greedy generation
against generation without the cache.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gptlab import Decoder
from gptlab.nn import (MLP, LayerNorm, LearnedPositions, NoPositions, PreNormBlock, ReLU2MLP,
                       RMSNorm, RotaryPositions)
from gptlab.plugins.cuda_kernels import build
from gptlab.plugins.cuda_kernels.loader import NativeLibrary, load
from gptlab.plugins.cuda_kernels.ops import _threads

#: The order of a block's parameters in the C call (see gptlab_kernels.h).
_PARAMS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
           "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
           "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


def _seam(attn) -> tuple[nn.Module | None, nn.Module | None]:
    """(the QKNorm module, the Rotary module), each or None, at an attention's position seam."""
    from gptlab.nn import QKChain, QKNorm, Rotary

    parts = attn.qk_positions
    parts = [] if parts is None else list(parts.parts) if type(parts) is QKChain else [parts]
    return tuple(next((p for p in parts if type(p) is cls), None) for cls in (QKNorm, Rotary))


class FusedDecoder(Decoder):
    """Runs ``model`` for one new token per sequence in one C call: embeddings, every block
    (appending to the KV cache), the final norm and the head.

    Made per generation window (:meth:`gptlab.plugins.models.transformer.Transformer.new_cache`),
    so the parameters' addresses are taken once per window; it keeps the parameters alive.
    """

    name = "fused"
    priority = 10
    description = "the whole transformer for one new token in one C call (csrc/cpu/decode.c)"
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.float32})

    @classmethod
    def unavailable_reasons(cls, device):
        return [r for r in [build.missing_compiler_reason(build.CPU)] if r]

    @classmethod
    def not_supported_reasons(cls, request):
        from gptlab.plugins.cuda_kernels.backends import FlashAttention
        from gptlab.plugins.cuda_kernels.layer_kernels import NativeKernels

        r = super().not_supported_reasons(request)
        c = request.components
        if request.model.name != "transformer":
            return r + [f"model {request.model.name!r} is not the transformer"]
        if c.block is not PreNormBlock:
            r.append(f"block {c.block.name!r} is not prenorm")
        if c.norm_class not in (LayerNorm, RMSNorm):
            r.append(f"norm {c.norm_class.name!r} is not layernorm or rmsnorm")
        if c.mlp_class not in (MLP, ReLU2MLP):
            r.append(f"mlp {c.mlp_class.name!r} is not gelu or relu2")
        if c.position not in (LearnedPositions, RotaryPositions, NoPositions):
            r.append(f"position {c.position.name!r} is not learned, rotary or none")
        if type(c.attention) is not FlashAttention:
            r.append(f"attention {c.attention.name!r} is not the flash backend on the native "
                     f"kernels")
        if type(c.kernels) is not NativeKernels:
            r.append(f"layer kernels {getattr(c.kernels, 'name', None)!r} are not native")
        return r

    @classmethod
    def prepare(cls, request):
        load("cpu")

    def __init__(self, model: nn.Module, lib: NativeLibrary | None = None):
        super().__init__(model)
        self.lib = None  # None: this model's weights are not float32 on the CPU
        if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
            return
        self.lib = lib or load("cpu")
        cfg = model.config
        self.n_layer, self.c, self.nh, self.vocab = (cfg.n_layer, cfg.n_embd, cfg.n_head,
                                                     cfg.vocab_size)
        ffi, ptr = self.lib.ffi, self.lib.ptr
        first = model.blocks[0]
        qk_norm, rotary = _seam(first.attn)
        self.spec = ffi.new("gptlab_decode_spec *")
        self.spec.eps = first.ln_1.eps
        self.spec.rms_norm = type(first.ln_1) is RMSNorm
        self.spec.relu2 = type(first.mlp) is ReLU2MLP
        self.spec.qk_norm = qk_norm is not None
        self.spec.qk_eps = 0.0 if qk_norm is None else qk_norm.eps
        # rotary: the rows of its (max_len, hs/2) cos and sin tables, pointed at per step
        self.rope = None if rotary is None else (rotary.cos.contiguous(), rotary.sin.contiguous())

        def pointer(t):
            if t is not None:
                self.tensors.append(t.detach().contiguous())
                return ptr(self.tensors[-1])
            return ffi.NULL

        self.tensors = []  # what the pointers point into
        named = [dict(b.named_parameters()) for b in model.blocks]
        self.params = ffi.new("float *[]", [pointer(p.get(n)) for p in named for n in _PARAMS])
        wpe = getattr(model, "wpe", None)
        self.wte, self.wpe = pointer(model.wte.weight), pointer(None if wpe is None else wpe.weight)
        self.norm = pointer(model.ln_f.weight), pointer(getattr(model.ln_f, "bias", None))
        self.head = pointer(model.lm_head.weight)
        self._ws = self._kv = None

    def usable(self) -> bool:
        """In float32 inference only: a step with gradients, in training mode or under autocast
        goes op by op."""
        return self.lib is not None and not self.model.training \
            and not torch.is_autocast_enabled("cpu") and not (
                torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters()))

    def _caches(self, cache, B: int, hs: int, like: torch.Tensor):
        """The float *[n_layer] arrays of the layers' key and value storage (made again only
        when a layer's storage changed), or None if any is not float32 (B, nh, capacity, hs)
        and contiguous, as the C step writes it (a cache filled under autocast, or for
        another batch)."""
        storage = [layer.storage(B, self.nh, hs, like) for layer in cache.layers]
        if self._kv is None or self._kv[4] != B \
                or any(k is not k0 for (k, _), k0 in zip(storage, self._kv[0])):
            cap = storage[0][0].size(2)
            if any(t.dtype != torch.float32 or t.shape != (B, self.nh, cap, hs)
                   or not t.is_contiguous() for kv in storage for t in kv):
                return None
            ffi, ptr = self.lib.ffi, self.lib.ptr
            self._kv = ([k for k, _ in storage],
                        ffi.new("float *[]", [ptr(k) for k, _ in storage]),
                        ffi.new("float *[]", [ptr(v) for _, v in storage]),
                        storage[0][0].size(2), B, storage)  # (keeps the storage alive)
        return self._kv[1:4]

    def __call__(self, idx: torch.Tensor, cache) -> torch.Tensor | None:
        """idx (B, 1), the new tokens; returns their logits (B, 1, vocab) with every layer's
        keys and values appended to ``cache`` (its layers advanced; ``cache.length`` is the
        caller's), or None where the step cannot run here (the caller then runs the model op
        by op)."""
        if idx.dim() != 2 or idx.size(1) != 1 or not self.usable():
            return None
        B, C, lib = idx.size(0), self.c, self.lib
        pos = cache.layers[0].length
        if self.rope is not None:
            cos, sin = self.rope
            if pos >= cos.size(0):
                return None
            self.spec.rope_cos, self.spec.rope_sin = lib.ptr(cos[pos]), lib.ptr(sin[pos])
        logits = torch.empty(B, 1, self.vocab, dtype=torch.float32)
        kv = self._caches(cache, B, C // self.nh, logits)
        if kv is None:
            return None
        ks, vs, max_t = kv
        if self._ws is None or self._ws[0] != B:
            nbytes = lib.lib.gptlab_decode_step_workspace_size(B, C, self.nh)
            self._ws = (B, logits.new_empty(-(-nbytes // 4)))
        ids = idx.to(torch.int64).contiguous()  # (an int32 prompt works with nn.Embedding)
        lib.call("gptlab_decode_step_f32", lib.ptr(logits), ks, vs, lib.ptr(self._ws[1], "void *"),
                 lib.ptr(ids, "int64_t *"), self.wte, self.wpe, self.params, *self.norm,
                 self.head, self.spec, self.n_layer, B, C, self.nh, self.vocab, pos, max_t,
                 _threads(12 * C * C * B))  # a block's multiply-adds: one thread below ~1M
        for layer in cache.layers:
            layer.length += 1
        return logits
