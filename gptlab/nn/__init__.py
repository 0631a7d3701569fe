"""gptlab's transformer building blocks, written out by hand: the public API for plugin authors.

Everything a plugin needs to assemble its own block or model (none ever imports
``gptlab.plugins.*``)::

    from gptlab import Block
    from gptlab.nn import LayerNorm, MLP, MultiHeadAttention

    class ParallelBlock(Block):          # GPT-J: x + attn(ln(x)) + mlp(ln(x))
        name = "parallel"
        def __init__(self, config, attention):
            super().__init__(config, attention)
            self.ln = LayerNorm(config.n_embd, bias=config.bias)
            self.attn = MultiHeadAttention(config, attention)
            self.mlp = MLP(config)

- :class:`LayerNorm`, :class:`MLP` (:mod:`gptlab.nn.layers`); :class:`RMSNorm`, :class:`QKNorm`
  (:mod:`gptlab.nn.norms`); :class:`ReLU2MLP`, :class:`SwiGLUMLP` (:mod:`gptlab.nn.mlps`);
- position schemes (``learned``, ``rotary``, ``none``) and the :class:`Rotary` seam module
  (:mod:`gptlab.nn.positions`);
- :class:`SingleHeadAttention`, :class:`MultiHeadAttention` with its position seam and
  :func:`set_qk_positions`, :class:`LayerKV` (:mod:`gptlab.nn.attention`);
- :class:`PreNormBlock` (GPT-2), :class:`PostNormBlock` (Vaswani et al.) (:mod:`gptlab.nn.blocks`);
- :func:`init_gpt2`, GPT-2's initialisation with scaled residual projections (:mod:`gptlab.nn.init`);
- :func:`causal_mask`, :func:`default_scale` (from :mod:`gptlab.core.attention`).
"""

from gptlab.core.attention import causal_mask, default_scale
from gptlab.nn.attention import LayerKV, MultiHeadAttention, SingleHeadAttention, set_qk_positions
from gptlab.nn.blocks import PostNormBlock, PreNormBlock
from gptlab.nn.init import init_gpt2
from gptlab.nn.layers import MLP, LayerNorm
from gptlab.nn.mlps import ReLU2MLP, SwiGLUMLP
from gptlab.nn.norms import QKNorm, RMSNorm
from gptlab.nn.positions import (LearnedPositions, NoPositions, QKChain, Rotary,
                                 RotaryPositions)

__all__ = ["LayerNorm", "MLP", "SingleHeadAttention", "MultiHeadAttention", "LayerKV",
           "set_qk_positions", "PreNormBlock", "PostNormBlock", "init_gpt2", "causal_mask",
           "default_scale", "RMSNorm", "QKNorm", "ReLU2MLP", "SwiGLUMLP", "Rotary", "QKChain",
           "LearnedPositions", "RotaryPositions", "NoPositions"]
