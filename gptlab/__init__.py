"""gptlab: build a GPT-style language model from scratch, part by swappable part.

The public API for plugin authors is this package (the base classes and configs below),
:mod:`gptlab.nn` (the building blocks) and :mod:`gptlab.functional` (gptlab's attention as a
drop-in for ``F.scaled_dot_product_attention``); nothing else needs importing. A plugin
implements the hooks of :mod:`gptlab.core.hookspecs`::

    from gptlab import AttentionBackend, hookimpl

    class MyAttention(AttentionBackend):
        name = "mine"
        def forward(self, q, k, v, *, causal=True, dropout_p=0.0, scale=None): ...

    @hookimpl
    def register_attention_backends():
        return MyAttention

Names other than ``hookimpl`` are imported on first use, so ``import gptlab`` (and torch-free
modules such as :mod:`gptlab.plot`) do not import torch.
"""

import importlib

import pluggy

__version__ = "0.3.0"

#: Marker for plugin hook implementations (``@hookimpl def register_models(): ...``).
hookimpl = pluggy.HookimplMarker("gptlab")

_LAZY = {
    # the base classes a plugin implements (one hook each, see gptlab.core.hookspecs)
    "Tokenizer": "gptlab.core.interfaces",
    "LanguageModel": "gptlab.core.interfaces",
    "Block": "gptlab.core.interfaces",
    "Norm": "gptlab.core.interfaces",
    "FeedForward": "gptlab.core.interfaces",
    "PositionScheme": "gptlab.core.interfaces",
    "Decoder": "gptlab.core.interfaces",
    "AttentionBackend": "gptlab.core.attention",
    "LayerKernels": "gptlab.core.layer_kernels",
    "Matmul": "gptlab.core.matmuls",
    "OptimizerRecipe": "gptlab.core.optimizers",
    # what they are built from and asked for
    "Components": "gptlab.core.interfaces",
    "AttentionRequest": "gptlab.core.attention",
    "KernelRequest": "gptlab.core.layer_kernels",
    "MatmulRequest": "gptlab.core.matmuls",
    "DecodeRequest": "gptlab.core.interfaces",
    "ModelConfig": "gptlab.core.config",
    "TrainConfig": "gptlab.core.config",
    "GptlabError": "gptlab.core.errors",
    "load_registry": "gptlab.core.plugins",
}

__all__ = ["hookimpl", "__version__", *_LAZY]


_SUBMODULES = ("nn", "functional")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"gptlab.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gptlab' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
