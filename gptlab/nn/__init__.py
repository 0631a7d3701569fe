"""gptlab's transformer building blocks, written out by hand: the public API for plugin authors.

Everything a plugin needs to assemble its own block or model (none ever imports
``gptlab.plugins.*`` or ``gptlab.core.*``)::

    from gptlab import Block
    from gptlab.nn import MultiHeadAttention

    class ParallelBlock(Block):          # GPT-J: x + attn(ln(x)) + mlp(ln(x))
        name = "parallel"
        def __init__(self, config, components):
            super().__init__(config, components)
            self.ln = components.norm(config.n_embd, bias=config.bias)      # --norm
            self.attn = MultiHeadAttention(config, components.attention,    # --attention
                                           components.position,             # --position
                                           matmul=components.matmul)        # --matmul
            self.mlp = components.mlp(config)                               # --mlp

- norms (:mod:`gptlab.nn.norms`): :class:`LayerNorm`, :class:`RMSNorm`, :class:`QKNorm`,
  :class:`NoNorm` (``none``);
- MLPs (:mod:`gptlab.nn.mlps`): :class:`MLP` (GELU), :class:`ReLU2MLP`, :class:`SwiGLUMLP`,
  :class:`NoMLP` (``none``);
- position schemes (``learned``, ``rotary``, ``none``) and the :class:`Rotary` seam module
  (:mod:`gptlab.nn.positions`);
- attention (:mod:`gptlab.nn.attention`): :class:`SingleHeadAttention`,
  :class:`MultiHeadAttention` with its position seam, :class:`LayerKV` (one layer's KV cache),
  :func:`attention_weights` (the softmax written out);
- blocks (:mod:`gptlab.nn.blocks`): :class:`PreNormBlock` (GPT-2), :class:`PostNormBlock`
  (Vaswani et al.), :class:`PlainBlock` (no residual connections), :class:`SingleHeadBlock`;
- :class:`TorchKernels`, the ``torch`` layer kernels: these modules' own formulas
  (:mod:`gptlab.nn.layer_kernels`);
- :class:`Linear` (``nn.Linear`` computed by the model's matrix products, ``--matmul``) and
  :class:`TorchMatmul`, the ``torch`` products (:mod:`gptlab.nn.linear`);
- :func:`init_gpt2`, GPT-2's initialisation with scaled residual projections (:mod:`gptlab.nn.init`);
- :func:`causal_mask`, :func:`default_scale` (from :mod:`gptlab.core.attention`).
"""

from gptlab.core.attention import causal_mask, default_scale
from gptlab.nn.attention import (LayerKV, MultiHeadAttention, SingleHeadAttention,
                                 attention_weights)
from gptlab.nn.blocks import PlainBlock, PostNormBlock, PreNormBlock, SingleHeadBlock
from gptlab.nn.init import init_gpt2
from gptlab.nn.layer_kernels import TorchKernels
from gptlab.nn.linear import Linear, TorchMatmul
from gptlab.nn.mlps import MLP, NoMLP, ReLU2MLP, SwiGLUMLP
from gptlab.nn.norms import LayerNorm, NoNorm, QKNorm, RMSNorm
from gptlab.nn.positions import (LearnedPositions, NoPositions, QKChain, Rotary,
                                 RotaryPositions)

__all__ = ["LayerNorm", "RMSNorm", "QKNorm", "NoNorm", "MLP", "ReLU2MLP", "SwiGLUMLP", "NoMLP",
           "SingleHeadAttention", "MultiHeadAttention", "LayerKV", "attention_weights",
           "Linear", "TorchMatmul", "PreNormBlock", "PostNormBlock", "PlainBlock", "SingleHeadBlock", "init_gpt2", "causal_mask", "default_scale", "Rotary", "QKChain",
           "LearnedPositions", "RotaryPositions", "NoPositions", "TorchKernels"]
