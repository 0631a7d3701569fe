"""Hook specifications: the whole plugin API of gptlab.

A plugin is any importable module (or object) with functions marked ``@gptlab.hookimpl`` whose
names match the specs below, advertised in its distribution's ``pyproject.toml``::

    [project.entry-points.gptlab]
    my_plugin = "my_package.plugin_module"

The built-in tokenizers, models, blocks and attention backends are registered through these same
hooks and the same entry-point group. Each ``register_*`` hook returns one class or a list of
classes; every class carries a unique ``name`` (two plugins registering the same name is an error
naming both). See the README section "Writing a plugin".
"""

import pluggy

hookspec = pluggy.HookspecMarker("gptlab")


@hookspec
def register_tokenizers():
    """Return a :class:`gptlab.Tokenizer` subclass, or a list of them.

    Selected with ``gpt run --tokenizer NAME``.
    """


@hookspec
def register_models():
    """Return a :class:`gptlab.LanguageModel` subclass, or a list of them.

    Selected with ``gpt run --model NAME``. The model is built as ``cls(config, components)``
    from a :class:`gptlab.core.config.ModelConfig` and the chosen block class and attention
    backend.
    """


@hookspec
def register_blocks():
    """Return a :class:`gptlab.Block` subclass (a transformer block), or a list.

    Selected with ``gpt run --block NAME``; the transformer stacks ``n_layer`` of them.
    """


@hookspec
def register_attention_backends():
    """Return an :class:`gptlab.AttentionBackend` subclass, or a list of them.

    Selected with ``gpt run --attention NAME``; ``auto`` picks, among the backends whose
    ``not_supported_reasons(request)`` is empty, the fastest measured on the run's shape (the
    highest ``priority`` where nothing is measured; see :mod:`gptlab.core.autotune`).
    """


@hookspec
def register_layer_kernels():
    """Return a :class:`gptlab.core.layer_kernels.LayerKernels` subclass, or a list of them:
    implementations of LayerNorm, bias + GELU and the cross-entropy loss.

    Selected with ``gpt run --kernels NAME``; ``auto`` picks the highest ``priority`` one whose
    ``not_supported_reasons(request)`` is empty (and whose ``prepare(request)`` succeeds).
    """


@hookspec
def register_norms():
    """Return a :class:`gptlab.core.interfaces.Norm` subclass, or a list of them.

    Selected with ``gpt run --norm NAME`` (built in: ``layernorm``, ``rmsnorm``); the
    transformer uses it for every norm of its blocks and its final norm.
    """


@hookspec
def register_mlps():
    """Return a :class:`gptlab.core.interfaces.FeedForward` subclass, or a list of them.

    Selected with ``gpt run --mlp NAME`` (built in: ``gelu``, ``relu2``, ``swiglu``); the
    transformer uses it as every block's MLP.
    """


@hookspec
def register_positions():
    """Return a :class:`gptlab.core.interfaces.PositionScheme` subclass, or a list of them.

    Selected with ``gpt run --position NAME`` (built in: ``learned``, ``rotary``, ``none``).
    """


@hookspec
def register_optimizers():
    """Return a :class:`gptlab.core.optimizers.OptimizerRecipe` subclass, or a list of them.

    Selected with ``gpt run --optimizer NAME`` (built in: ``adamw``, ``muon``). Parameter
    groups with a ``base_lr`` follow the learning-rate schedule scaled to it.
    """


@hookspec
def register_commands(cli):
    """Add click subcommands to the ``gpt`` command group ``cli`` (``cli.add_command(cmd)``).

    Return value is ignored. A plugin whose hook raises is reported as a warning and skipped.
    """
