"""The base classes plugins implement: :class:`Tokenizer`, :class:`Block`,
:class:`LanguageModel`, and the parts a transformer is assembled from: :class:`Norm`,
:class:`FeedForward` and :class:`PositionScheme` (attention backends: :mod:`gptlab.core.attention`).

A model is nanoGPT-shaped (Karpathy 2022): ``forward(idx, targets=None) -> (logits, loss)``
and ``generate(idx, max_new_tokens, ...)``; it is built as ``cls(config, components)`` where
:class:`Components` carries the parts chosen by name (the block class, the attention backend,
the norm, the feed-forward and the position scheme).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import attrs
import torch
import torch.nn as nn
from torch.nn import functional as F

from gptlab._compat import moved
from gptlab.core.attention import AttentionBackend
from gptlab.core.config import ModelConfig
from gptlab.core.errors import ConfigError
from gptlab.core.generation import generate as _generate


# --------------------------------------------------------------------------- tokenizers
class Tokenizer(ABC):
    """Maps text to integer ids and back. ``train(text)`` fits the vocabulary."""

    name: ClassVar[str]

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def train(self, text: str) -> None:
        """Fit the vocabulary on ``text``."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text to ids; raises :class:`~gptlab.core.errors.TokenizerError` on unknown input."""

    @abstractmethod
    def decode(self, ids) -> str:
        """Ids (any iterable of ints) to text."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Everything needed to rebuild the tokenizer: plain Python values only."""

    @classmethod
    @abstractmethod
    def from_state(cls, state: dict) -> Tokenizer:
        """Rebuild a tokenizer saved by :meth:`state_dict`."""


# --------------------------------------------------------------------------- models
@attrs.frozen
class Components:
    """Swappable parts handed to a model's constructor, chosen by name through the registry.

    ``norm``, ``feedforward`` and ``position`` left at ``None`` mean GPT-2's: LayerNorm, the GELU
    MLP and a learned position table."""

    block: type | None = None  # a Block subclass
    attention: AttentionBackend | None = None
    norm: type | None = None  # a Norm subclass (--norm)
    feedforward: type | None = None  # a FeedForward subclass (--mlp)
    position: type | None = None  # a PositionScheme subclass (--position)


class Norm(nn.Module):
    """A normalisation over the last dim: ``(..., ndim) -> (..., ndim)``. Built as
    ``cls(ndim, bias=..., eps=...)``; the transformer puts the one chosen with ``--norm`` wherever
    a block or the model uses :class:`gptlab.nn.LayerNorm`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def __init__(self, ndim: int, bias: bool = True, eps: float = 1e-5):
        super().__init__()


class FeedForward(nn.Module):
    """The position-wise MLP of a block: ``(B, T, C) -> (B, T, C)``, built as ``cls(config)``;
    the transformer puts the one chosen with ``--mlp`` wherever a block uses
    :class:`gptlab.nn.MLP`. Its last Linear writes into the residual stream and is named
    ``c_proj`` (so GPT-2's init scales it, and ``--zero-init`` zeroes it)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def __init__(self, config: ModelConfig):
        super().__init__()


class PositionScheme:
    """How a transformer knows where each token is (``--position``).

    ``learned_table``: the model adds a learned (block_size, C) table to the token embeddings
    (GPT-2). :meth:`qk_module` returns a module installed at the attention's position seam
    (``q, k = module(q, k, pos)``, see :class:`gptlab.nn.MultiHeadAttention`), or None.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    learned_table: ClassVar[bool] = False

    @classmethod
    def check(cls, config: ModelConfig) -> None:
        """Raise :class:`~gptlab.core.errors.ConfigError` if ``config`` cannot use it."""

    @classmethod
    def qk_module(cls, config: ModelConfig) -> nn.Module | None:
        return None


class Block(nn.Module):
    """A transformer block: ``(B, T, C) -> (B, T, C)``. Built as ``cls(config, attention)``.

    Blocks that set ``supports_kv_cache = True`` accept ``forward(x, kv_cache)`` and pass the
    cache to their attention (see :class:`gptlab.nn.MultiHeadAttention`); others make
    generation recompute.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    supports_kv_cache: ClassVar[bool] = False

    def __init__(self, config: ModelConfig, attention: AttentionBackend):
        super().__init__()


class LanguageModel(nn.Module):
    """A next-token model: ``forward(idx, targets=None) -> (logits, loss)`` plus ``generate``.

    Built as ``cls(config, components)``. ``idx`` is ``(B, T)`` int64 with ``T <= block_size``;
    logits are ``(B, T, vocab_size)``; loss is the mean cross-entropy or ``None``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    uses_attention: ClassVar[bool] = True  # False: no backend is selected (e.g. bigram)
    #: True if the model implements :meth:`new_cache` and :meth:`forward_cached`.
    supports_kv_cache: ClassVar[bool] = False

    def __init__(self, config: ModelConfig, components: Components):
        super().__init__()
        if config.vocab_size < 1:
            raise ConfigError("vocab_size must be set (from the tokenizer) before building a model")
        self.config = config

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def loss(self, logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
        """Mean cross-entropy; computed by the model's layer kernels if it has some."""
        if targets is None:
            return None
        logits, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
        kernels = getattr(self, "layer_kernels", None)
        if kernels is not None:
            return kernels.cross_entropy(logits, targets)
        return F.cross_entropy(logits, targets)

    # ---- generation (the loop lives in gptlab.core.generation) ---------------------------
    def kv_cache_usable(self) -> bool:
        """Whether generation can use the KV cache (model and its attention backend allow it)."""
        return self.supports_kv_cache

    def new_cache(self):
        raise NotImplementedError

    def forward_cached(self, idx: torch.Tensor, cache) -> torch.Tensor:
        """Logits (B, T_new, vocab) for ``idx`` following the tokens already in ``cache``."""
        raise NotImplementedError

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 on_token=None) -> torch.Tensor:
        """Append up to ``max_new_tokens`` sampled tokens to ``idx``: see
        :func:`gptlab.core.generation.generate`."""
        return _generate(self, idx, max_new_tokens, temperature, top_k, top_p, generator,
                        use_cache, on_token)


# gptlab 0.1 kept the attention interface and sampling here
__getattr__ = moved(__name__, {
    "AttentionRequest": "gptlab.core.attention",
    "causal_mask": "gptlab.core.attention", "default_scale": "gptlab.core.attention",
    "device_unavailable_reason": "gptlab.core.devices", "sample_next": "gptlab.core.generation"})
