"""Transformer blocks: attention and MLP sub-layers joined by residual connections.

``prenorm`` is the GPT-2 arrangement (Radford et al. 2019): a norm before each sub-layer,
``x + attn(ln(x))``. ``postnorm`` is the original arrangement of Vaswani et al. 2017:
``ln(x + attn(x))``, kept to show a block swap and to compare training stability. A block builds
every module it runs from the model's :class:`~gptlab.core.interfaces.Components`: the norm
(``--norm``), the MLP (``--mlp``), and the attention with its backend (``--attention``) and its
position seam (``--position``, ``--qk-norm``).
"""

from gptlab.core.interfaces import Block
from gptlab.nn.attention import MultiHeadAttention


class PreNormBlock(Block):
    name = "prenorm"
    supports_kv_cache = True
    description = "x + attn(ln1(x)); x + mlp(ln2(x))  (GPT-2)"

    def __init__(self, config, components):
        super().__init__(config, components)
        self.ln_1 = components.norm(config.n_embd, bias=config.bias)
        self.attn = MultiHeadAttention(config, components.attention, components.position)
        self.ln_2 = components.norm(config.n_embd, bias=config.bias)
        self.mlp = components.mlp(config)

    def forward(self, x, kv_cache=None):  # (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))


class PostNormBlock(Block):
    name = "postnorm"
    supports_kv_cache = True
    description = "ln1(x + attn(x)); ln2(x + mlp(x))  (original Transformer)"

    def __init__(self, config, components):
        super().__init__(config, components)
        self.attn = MultiHeadAttention(config, components.attention, components.position)
        self.ln_1 = components.norm(config.n_embd, bias=config.bias)
        self.mlp = components.mlp(config)
        self.ln_2 = components.norm(config.n_embd, bias=config.bias)

    def forward(self, x, kv_cache=None):
        x = self.ln_1(x + self.attn(x, kv_cache))
        return self.ln_2(x + self.mlp(x))
