"""Hook specifications: the whole plugin API of gptlab.

A plugin is any importable module (or object) with functions marked ``@gptlab.hookimpl`` whose
names match the specs below, advertised in its distribution's ``pyproject.toml``::

    [project.entry-points.gptlab]
    my_plugin = "my_package.plugin_module"

The built-in parts are registered through these same hooks and the same entry-point group. Each
``register_*`` hook returns one class or a list of classes, each with a unique ``name`` (two
plugins registering the same name is an error naming both); the base classes are importable
from :mod:`gptlab`. See docs/plugins.md.
"""

import pluggy

hookspec = pluggy.HookspecMarker("gptlab")


@hookspec
def register_tokenizers():
    """:class:`gptlab.Tokenizer` subclasses, chosen with ``--tokenizer`` (built in: char)."""


@hookspec
def register_models():
    """:class:`gptlab.LanguageModel` subclasses, built as ``cls(config, components)`` and
    chosen with ``--model`` (built in: bigram, transformer)."""


@hookspec
def register_blocks():
    """:class:`gptlab.Block` subclasses, built as ``cls(config, components)`` ``n_layer`` times
    by the transformer; chosen with ``--block`` (built in: prenorm, postnorm, plain,
    single-head)."""


@hookspec
def register_attention_backends():
    """:class:`gptlab.AttentionBackend` subclasses, chosen with ``--attention`` (``auto``: the
    fastest measured among those that fit, see :mod:`gptlab.core.autotune`)."""


@hookspec
def register_layer_kernels():
    """:class:`gptlab.LayerKernels` subclasses (LayerNorm, bias + GELU, the loss), chosen with
    ``--kernels`` (``auto``: the highest priority that fits; built in: torch, native)."""


@hookspec
def register_matmuls():
    """:class:`gptlab.Matmul` subclasses (the Linear layers' products), chosen with ``--matmul``
    (``auto``: the fastest measured on the run's shapes; built in: torch, onednn)."""


@hookspec
def register_decoders():
    """:class:`gptlab.Decoder` subclasses: fused steps for cached decoding, the highest
    priority that fits a model taken when it is built (built in: the native kernels' one)."""


@hookspec
def register_norms():
    """:class:`gptlab.Norm` subclasses, chosen with ``--norm`` for every block and the final
    norm (built in: layernorm, rmsnorm, none)."""


@hookspec
def register_mlps():
    """:class:`gptlab.FeedForward` subclasses, chosen with ``--mlp`` for every block (built
    in: gelu, relu2, swiglu, none)."""


@hookspec
def register_positions():
    """:class:`gptlab.PositionScheme` subclasses, chosen with ``--position`` (built in:
    learned, rotary, none)."""


@hookspec
def register_optimizers():
    """:class:`gptlab.OptimizerRecipe` subclasses, chosen with ``--optimizer`` (built in:
    adamw, muon)."""


@hookspec
def register_commands(cli):
    """Add click subcommands to the ``gpt`` group ``cli`` (``cli.add_command(cmd)``)."""
