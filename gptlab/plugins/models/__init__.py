"""Built-in models (``bigram``, ``transformer``), transformer blocks (``prenorm``,
``postnorm``), norms (``layernorm``, ``rmsnorm``), MLPs (``gelu``, ``relu2``, ``swiglu``),
position schemes (``learned``, ``rotary``, ``none``) and the ``torch`` layer kernels, registered
through the ``gptlab`` entry points like any third party's."""

from gptlab import hookimpl
from gptlab.nn import (MLP, LayerNorm, LearnedPositions, NoPositions, PostNormBlock,
                       PreNormBlock, ReLU2MLP, RMSNorm, RotaryPositions, SwiGLUMLP, TorchKernels)
from gptlab.plugins.models.bigram import BigramLanguageModel
from gptlab.plugins.models.transformer import Transformer


@hookimpl
def register_models():
    return [BigramLanguageModel, Transformer]


@hookimpl
def register_blocks():
    return [PreNormBlock, PostNormBlock]


@hookimpl
def register_norms():
    return [LayerNorm, RMSNorm]


@hookimpl
def register_mlps():
    return [MLP, ReLU2MLP, SwiGLUMLP]


@hookimpl
def register_positions():
    return [LearnedPositions, RotaryPositions, NoPositions]


@hookimpl
def register_layer_kernels():
    return [TorchKernels]
