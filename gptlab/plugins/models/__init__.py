"""Built-in models (``bigram``, ``transformer``), transformer blocks (``prenorm``,
``postnorm``), norms (``layernorm``, ``rmsnorm``), MLPs (``gelu``, ``relu2``, ``swiglu``) and
position schemes (``learned``, ``rotary``, ``none``), registered through the ``gptlab`` entry
points like any third party's."""

from gptlab import hookimpl
from gptlab.nn import PostNormBlock, PreNormBlock
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
    from gptlab.nn import LayerNorm, RMSNorm

    return [LayerNorm, RMSNorm]


@hookimpl
def register_mlps():
    from gptlab.nn import MLP, ReLU2MLP, SwiGLUMLP

    return [MLP, ReLU2MLP, SwiGLUMLP]


@hookimpl
def register_positions():
    from gptlab.nn import LearnedPositions, NoPositions, RotaryPositions

    return [LearnedPositions, RotaryPositions, NoPositions]


@hookimpl
def register_layer_kernels():
    from gptlab.core.layer_kernels import TorchKernels

    return [TorchKernels]
