"""GPT-2's weight initialisation, as one rule (Radford et al. 2019, section 2.3).

Every ``nn.Linear`` and ``nn.Embedding`` weight is drawn from N(0, 0.02) and every Linear bias
is zero, except the *residual projections*: the last Linear of each sub-layer that adds into
the residual stream, drawn from N(0, 0.02 / sqrt(2 * n_layer)) so that the variance of the
residual stream does not grow with depth (each block adds two such sub-layers). A residual
projection is any Linear whose attribute name is :data:`RESIDUAL_PROJECTION` (``c_proj``, the
name GPT-2 and nanoGPT use); blocks written by plugins follow the same convention.
"""

from __future__ import annotations

import math

import torch.nn as nn

STD = 0.02
RESIDUAL_PROJECTION = "c_proj"


def residual_std(n_layer: int) -> float:
    return STD / math.sqrt(2 * n_layer)


def init_gpt2(model: nn.Module, n_layer: int) -> None:
    """Initialise ``model``'s Linear and Embedding layers in place (see the module docstring)."""
    residual = {id(m) for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] == RESIDUAL_PROJECTION}

    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = residual_std(n_layer) if id(module) in residual else STD
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=STD)

    model.apply(init)  # children before parents, in registration order (as nanoGPT)
