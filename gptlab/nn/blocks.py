"""Transformer blocks: attention and MLP sub-layers joined by residual connections.

``prenorm`` is the GPT-2 arrangement (Radford et al. 2019): LayerNorm before each sub-layer,
``x + attn(ln(x))``. ``postnorm`` is the original arrangement of Vaswani et al. 2017:
``ln(x + attn(x))``, kept to show a block swap and to compare training stability.
"""

from gptlab.core.interfaces import Block
from gptlab.nn.attention import MultiHeadAttention
from gptlab.nn.layers import MLP, LayerNorm


class PreNormBlock(Block):
    name = "prenorm"
    supports_kv_cache = True
    description = "x + attn(ln1(x)); x + mlp(ln2(x))  (GPT-2)"

    def __init__(self, config, attention):
        super().__init__(config, attention)
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = MultiHeadAttention(config, attention)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):  # (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))


class PostNormBlock(Block):
    name = "postnorm"
    supports_kv_cache = True
    description = "ln1(x + attn(x)); ln2(x + mlp(x))  (original Transformer)"

    def __init__(self, config, attention):
        super().__init__(config, attention)
        self.attn = MultiHeadAttention(config, attention)
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)

    def forward(self, x, kv_cache=None):
        x = self.ln_1(x + self.attn(x, kv_cache))
        return self.ln_2(x + self.mlp(x))
