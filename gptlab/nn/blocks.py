"""Transformer blocks: attention and MLP sub-layers, with or without residual connections.

``prenorm`` is the GPT-2 arrangement (Radford et al. 2019): a norm before each sub-layer,
``x + attn(ln(x))``. ``postnorm`` is the original arrangement of Vaswani et al. 2017:
``ln(x + attn(x))``, kept to show a block swap and to compare training stability. A block builds
every module it runs from the model's :class:`~gptlab.core.interfaces.Components`: the norm
(``--norm``), the MLP (``--mlp``), and the attention with its backend (``--attention``) and its
position seam (``--position``, ``--qk-norm``).

Two blocks leave parts out, for the ladder from the bigram to GPT (:mod:`gptlab.ladder`):
``plain`` has no residual connections (each sub-layer's output replaces its input: a "plain"
network in the sense of He et al. 2016, whose deep stacks train worse than residual ones), and
``single-head`` is the plain block with one attention head as wide as the model and no output
projection, the first self-attention of the "Let's build GPT" progression (Karpathy 2023).
"""

from gptlab.core.errors import ConfigError
from gptlab.core.interfaces import Block
from gptlab.nn.attention import MultiHeadAttention, SingleHeadAttention
from gptlab.nn.mlps import NoMLP


class PreNormBlock(Block):
    name = "prenorm"
    supports_kv_cache = True
    description = "x + attn(ln1(x)); x + mlp(ln2(x))  (GPT-2)"

    def __init__(self, config, components):
        super().__init__(config, components)
        self.ln_1 = components.norm(config.n_embd, bias=config.bias)
        self.attn = MultiHeadAttention(config, components.attention, components.position,
                                       matmul=components.matmul)
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
        self.attn = MultiHeadAttention(config, components.attention, components.position,
                                       matmul=components.matmul)
        self.ln_1 = components.norm(config.n_embd, bias=config.bias)
        self.mlp = components.mlp(config)
        self.ln_2 = components.norm(config.n_embd, bias=config.bias)

    def forward(self, x, kv_cache=None):
        x = self.ln_1(x + self.attn(x, kv_cache))
        return self.ln_2(x + self.mlp(x))


class PlainBlock(Block):
    name = "plain"
    supports_kv_cache = True
    description = "attn(ln1(x)) then mlp(ln2(x)): no residual connections"

    def __init__(self, config, components):
        super().__init__(config, components)
        self.ln_1 = components.norm(config.n_embd, bias=config.bias)
        self.attn = MultiHeadAttention(config, components.attention, components.position,
                                       matmul=components.matmul)
        self.ln_2 = components.norm(config.n_embd, bias=config.bias)
        self.mlp = components.mlp(config)

    def forward(self, x, kv_cache=None):  # (B, T, C) -> (B, T, C)
        x = self.attn(self.ln_1(x), kv_cache)  # no residual: the output replaces x
        if isinstance(self.mlp, NoMLP):  # --mlp none: no MLP sub-layer (its zeros would erase x)
            return x
        return self.mlp(self.ln_2(x))


class SingleHeadBlock(Block):
    name = "single-head"
    description = "head(ln1(x)) then mlp(ln2(x)): one head of width C, no projection, no residuals"

    def __init__(self, config, components):
        super().__init__(config, components)
        if config.n_head != 1:
            raise ConfigError(f"block single-head has one attention head; use --n-head 1, not "
                              f"{config.n_head}")
        self.ln_1 = components.norm(config.n_embd, bias=config.bias)
        self.attn = SingleHeadAttention(config.n_embd, config.n_embd, components.attention,
                                        config.dropout, bias=config.bias,
                                        matmul=components.matmul)
        self.ln_2 = components.norm(config.n_embd, bias=config.bias)
        self.mlp = components.mlp(config)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        x = self.attn(self.ln_1(x))  # no residual, and no projection: the head's output is x
        if isinstance(self.mlp, NoMLP):  # --mlp none: no MLP sub-layer (its zeros would erase x)
            return x
        return self.mlp(self.ln_2(x))
