"""A GPT-style decoder-only transformer (Radford et al. 2018/2019; Vaswani et al. 2017).

token (+ position) embeddings -> dropout -> n_layer blocks -> final norm -> linear to logits.
The block type, the attention backend, the norm, the MLP, the position scheme and the layer
kernels are components chosen by name (GPT-2's by default: pre-norm blocks, LayerNorm, the GELU
MLP, a learned position table); each block builds its own modules from them. The output head
shares its weight with the token embedding (Press & Wolf 2017) unless ``untied_head``.
Initialisation is GPT-2's (:func:`gptlab.nn.init_gpt2`); ``zero_init`` starts every residual
projection (and an untied head) at zero, as the nanoGPT speedrun does.
"""

import torch
import torch.nn as nn

from gptlab import AttentionRequest, LanguageModel
from gptlab.core.errors import ConfigError
from gptlab.nn import LayerKV, Linear, MultiHeadAttention, init_gpt2
from gptlab.nn.init import RESIDUAL_PROJECTION
from gptlab.nn.positions import qk_seam


class KVCache:
    """Per-layer keys and values of the tokens seen so far, for one generation window.

    Each layer's storage holds ``max_len`` tokens (the model's ``block_size``: a window never
    holds more), allocated once, on the first forward. ``decoder``: the fused decoding step for
    this window (a :class:`gptlab.Decoder`), or None."""

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
        self.decoder = components.decoder  # a Decoder class for cached decoding, or None
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        # position embeddings, if the scheme learns a table
        self.wpe = nn.Embedding(config.block_size, config.n_embd) \
            if components.position.learned_table else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(components.block(config, components)
                                    for _ in range(config.n_layer))
        self.ln_f = components.norm(config.n_embd, bias=config.bias)
        self.lm_head = Linear(config.n_embd, config.vocab_size, False, components.matmul)
        if not config.untied_head:
            self.lm_head.weight = self.wte.weight  # weight tying
        if qk_seam(config, components.position) is not None and not any(
                isinstance(m, MultiHeadAttention) for m in self.blocks.modules()):
            raise ConfigError(f"--position {components.position.name} / --qk-norm act on q and k "
                              f"inside gptlab.nn.MultiHeadAttention, which block "
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
        return KVCache(self.config.n_layer, self.config.block_size,
                       decoder=self.decoder(self) if self.decoder is not None else None)

    def forward_cached(self, idx, cache: KVCache):
        T = idx.size(1)
        if cache.length + T > self.config.block_size:
            raise ConfigError(f"KV cache would hold {cache.length + T} tokens, more than "
                              f"block_size {self.config.block_size}")
        if T == 1 and cache.decoder is not None:  # the fused step, if it runs
            logits = cache.decoder(idx, cache)
            if logits is not None:
                cache.length += 1
                return logits
        # positions length .. length + T - 1: wpe's rows, sliced (no position tensor per token)
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe.weight[cache.length:cache.length + T]
        for block, layer_cache in zip(self.blocks, cache.layers):
            x = block(x, layer_cache)
        cache.length += T
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)
