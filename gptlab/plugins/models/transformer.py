"""A GPT-style decoder-only transformer (Radford et al. 2018/2019; Vaswani et al. 2017).

token (+ position) embeddings -> dropout -> n_layer blocks -> final norm -> linear to logits.
The block type, the attention backend, the norm, the MLP and the position scheme are components
chosen by name (GPT-2's by default: LayerNorm, the GELU MLP, a learned position table); the
norm and MLP replace :class:`gptlab.nn.LayerNorm` and :class:`gptlab.nn.MLP` wherever a block
uses them, and a position scheme such as rotary goes in at the attention's position seam. The
output head shares its weight with the token embedding (Press & Wolf 2017) unless
``untied_head``. Initialisation is GPT-2's (:func:`gptlab.nn.init_gpt2`); ``zero_init`` starts
every residual projection (and an untied head) at zero, as the nanoGPT speedrun does.
"""

import torch
import torch.nn as nn

from gptlab import AttentionRequest, LanguageModel
from gptlab.core.errors import ConfigError
from gptlab.nn import (MLP, LayerKV, LayerNorm, LearnedPositions, QKChain, QKNorm, init_gpt2,
                       set_qk_positions)
from gptlab.nn.init import RESIDUAL_PROJECTION


def replace_modules(root: nn.Module, cls: type, make) -> int:
    """Replace every submodule of exactly type ``cls`` by ``make(old)``; returns how many."""
    count = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is cls:
                setattr(parent, name, make(child))
                count += 1
    return count


class KVCache:
    """Per-layer keys and values of the tokens seen so far, for one generation window.

    Each layer's storage holds ``max_len`` tokens (the model's ``block_size``: a window never
    holds more), allocated once, on the first forward. ``decoder``: the layer kernels' fused
    decoding step for this window (see :meth:`gptlab.core.layer_kernels.LayerKernels.decoder`),
    or None."""

    def __init__(self, n_layer: int, max_len: int | None = None, decoder=None):
        self.layers = [LayerKV(max_len) for _ in range(n_layer)]
        self.length = 0
        self.decoder = decoder


class Transformer(LanguageModel):
    supports_kv_cache = True
    name = "transformer"
    description = "GPT-2 style decoder: embeddings, n_layer blocks, final LayerNorm, tied head"

    def __init__(self, config, components):
        super().__init__(config, components)
        if components.block is None or components.attention is None:
            raise ConfigError("the transformer needs a block class and an attention backend")
        self.attention_backend = components.attention
        norm = components.norm or LayerNorm
        feedforward = components.feedforward or MLP
        position = components.position or LearnedPositions
        position.check(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        # position embeddings, if the scheme learns a table
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if position.learned_table \
            else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(components.block(config, components.attention)
                                    for _ in range(config.n_layer))
        if norm is not LayerNorm:
            replace_modules(self.blocks, LayerNorm,
                            lambda m: norm(m.weight.numel(), bias=m.bias is not None, eps=m.eps))
        if feedforward is not MLP:
            replace_modules(self.blocks, MLP, lambda m: feedforward(config))
        self.ln_f = norm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if not config.untied_head:
            self.lm_head.weight = self.wte.weight  # weight tying
        seam = [QKNorm()] if config.qk_norm else []
        seam += [m for m in [position.qk_module(config)] if m is not None]
        if seam and not set_qk_positions(self, seam[0] if len(seam) == 1 else QKChain(*seam)):
            raise ConfigError(f"--position {position.name} / --qk-norm act on q and k inside "
                              f"gptlab.nn.MultiHeadAttention, which block "
                              f"{components.block.name!r} does not use")
        init_gpt2(self, config.n_layer)
        if config.zero_init:  # residual projections (and an untied head) start at zero
            for name, m in self.named_modules():
                if isinstance(m, nn.Linear) and (name.rsplit(".", 1)[-1] == RESIDUAL_PROJECTION
                                                 or (m is self.lm_head and config.untied_head)):
                    nn.init.zeros_(m.weight)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ConfigError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, dtype=torch.long, device=idx.device))  # (T, C)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        return logits, self.loss(logits, targets)

    # ---- KV-cache decoding ---------------------------------------------------------------
    def kv_cache_usable(self) -> bool:
        """Blocks must thread the cache through, and the backend must accept fewer queries
        than keys (causal mask aligned bottom-right); otherwise generation recomputes."""
        if not all(getattr(b, "supports_kv_cache", False) for b in self.blocks):
            return False
        device = self.wte.weight.device.type
        req = AttentionRequest(device=device, dtype=self.wte.weight.dtype,
                               head_dim=self.config.head_dim, q_len=1,
                               k_len=self.config.block_size, requires_grad=False)
        try:
            return not type(self.attention_backend).not_supported_reasons(req)
        except Exception:  # a broken backend plugin: generate without the cache
            return False

    def new_cache(self) -> KVCache:
        kernels = getattr(self, "layer_kernels", None)
        return KVCache(self.config.n_layer, self.config.block_size,
                       decoder=kernels.decoder(self) if kernels is not None else None)

    def forward_cached(self, idx, cache: KVCache):
        T = idx.size(1)
        if cache.length + T > self.config.block_size:
            raise ConfigError(f"KV cache would hold {cache.length + T} tokens, more than "
                              f"block_size {self.config.block_size}")
        # positions length .. length + T - 1: wpe's rows, sliced (no position tensor per token)
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe.weight[cache.length:cache.length + T]
        y = cache.decoder(x, cache) if T == 1 and cache.decoder is not None else None
        if y is None:  # op by op
            for block, layer_cache in zip(self.blocks, cache.layers):
                x = block(x, layer_cache)
        else:  # one fused call per block (one new token)
            x = y
        cache.length += T
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)
