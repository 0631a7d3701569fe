"""Attention maps: the weights each head of a trained model puts on the earlier characters of a
prompt (``gpt attention``).

While the model runs the prompt, a forward pre-hook on each of its attention modules (those
with an ``attention_weights`` method: :class:`gptlab.nn.MultiHeadAttention`,
:class:`gptlab.nn.SingleHeadAttention`) keeps the input it receives. The weights are then
recomputed from that input with the module's own q and k (after its position seam: rotary,
QK-norm) and the written-out formula ``softmax(q k^T / sqrt(head_dim) + causal mask)``
(:func:`gptlab.nn.attention_weights`, Vaswani et al. 2017, eq. 1), whatever backend the model
runs: a flash kernel never forms them. Each row sums to 1 over the keys it may see and is 0
above the diagonal.
"""

from __future__ import annotations

import attrs
import torch

from gptlab.core.errors import ConfigError, GptlabError


@attrs.frozen
class AttentionMaps:
    """``tokens``: the prompt's tokens as text; ``maps``: per attention module, in the order the
    model runs them (``names``), its weights (n_head, T, T): row i over keys 0..i."""

    tokens: list[str]
    names: list[str]
    maps: list[torch.Tensor]


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every module of ``model`` that can say its attention weights."""
    return [(name, m) for name, m in model.named_modules()
            if callable(getattr(m, "attention_weights", None))]


@torch.no_grad()
def attention_maps(model, tokenizer, prompt: str) -> AttentionMaps:
    """The attention weights of every layer and head of ``model`` over ``prompt``."""
    ids = tokenizer.encode(prompt)  # unknown characters: a TokenizerError
    if not ids:
        raise ConfigError("the prompt is empty; give a few words with --prompt")
    limit = model.config.block_size
    if len(ids) > limit:
        raise ConfigError(f"the prompt is {len(ids)} tokens long; this model sees at most "
                          f"{limit} (its block size): shorten --prompt")
    modules = attention_modules(model)
    if not modules:
        raise GptlabError(f"the {model.config.model} model has no attention to draw; use a "
                          f"transformer's run")
    inputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args):
            inputs[name] = args[0]
        return hook

    hooks = [m.register_forward_pre_hook(keep(name)) for name, m in modules]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.tensor([ids], dtype=torch.long, device=device))
        maps = [m.attention_weights(inputs[name])[0].float().cpu() for name, m in modules]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return AttentionMaps(tokens=[tokenizer.decode([i]) for i in ids],
                         names=[name for name, _ in modules], maps=maps)
