"""gptlab: build a GPT-style language model from scratch, part by swappable part.

Plugins implement the hooks in :mod:`gptlab.core.hookspecs`, marked with :data:`hookimpl`::

    from gptlab import hookimpl

    @hookimpl
    def register_attention_backends():
        return MyBackend
"""

import pluggy

__version__ = "0.1.0"

#: Marker for plugin hook implementations (``@hookimpl def register_models(): ...``).
hookimpl = pluggy.HookimplMarker("gptlab")

__all__ = ["hookimpl", "__version__"]
