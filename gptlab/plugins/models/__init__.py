"""Built-in models (``bigram``, ``transformer``), transformer blocks (``prenorm``,
``postnorm``, ``plain``, ``single-head``), norms (``layernorm``, ``rmsnorm``, ``none``), MLPs
(``gelu``, ``relu2``, ``swiglu``, ``none``), position schemes (``learned``, ``rotary``, ``none``) and the ``torch`` layer kernels, registered
through the ``gptlab`` entry points like any third party's."""

from gptlab import hookimpl
from gptlab.nn import (MLP, LayerNorm, LearnedPositions, NoMLP, NoNorm, NoPositions,
                       PlainBlock, PostNormBlock, PreNormBlock, ReLU2MLP, RMSNorm,
                       RotaryPositions, SingleHeadBlock, SwiGLUMLP, TorchKernels)
from gptlab.plugins.models.bigram import BigramLanguageModel
from gptlab.plugins.models.transformer import Transformer


@hookimpl
def register_models():
    return [BigramLanguageModel, Transformer]


@hookimpl
def register_blocks():
    return [PreNormBlock, PostNormBlock, PlainBlock, SingleHeadBlock]


@hookimpl
def register_norms():
    return [LayerNorm, RMSNorm, NoNorm]


@hookimpl
def register_mlps():
    return [MLP, ReLU2MLP, SwiGLUMLP, NoMLP]


@hookimpl
def register_positions():
    return [LearnedPositions, RotaryPositions, NoPositions]


@hookimpl
def register_layer_kernels():
    return [TorchKernels]
