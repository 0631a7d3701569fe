"""Built-in models (``bigram``, ``transformer``) and transformer blocks (``prenorm``,
``postnorm``), registered through the ``gptlab`` entry points like any third party's."""

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
def register_layer_kernels():
    from gptlab.core.layer_kernels import TorchKernels

    return [TorchKernels]
