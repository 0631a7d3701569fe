"""Built-in optimisers (``adamw``, ``muon``), registered through the ``gptlab`` entry points
like any third party's (see :mod:`gptlab.core.optimizers`)."""

from gptlab import hookimpl


@hookimpl
def register_optimizers():
    from gptlab.core.optimizers import AdamWRecipe, MuonRecipe

    return [AdamWRecipe, MuonRecipe]
