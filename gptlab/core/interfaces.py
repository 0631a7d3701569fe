"""The base classes plugins implement: :class:`Tokenizer`, :class:`LanguageModel`,
:class:`Block`, and the parts a transformer is built from: :class:`Norm`, :class:`FeedForward`
and :class:`PositionScheme` (attention backends: :mod:`gptlab.core.attention`; layer kernels:
:mod:`gptlab.core.layer_kernels`).

A model is nanoGPT-shaped (Karpathy 2022): ``forward(idx, targets=None) -> (logits, loss)``
and ``generate(idx, max_new_tokens, ...)``. It is built as ``cls(config, components)``:
:class:`Components` carries the parts chosen by name (the block class, the attention backend,
the norm, the MLP, the position scheme, the layer kernels, the matrix products, the fused
decoder) and builds the norms and MLPs a block asks it for, so a block constructs every module
it runs itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import attrs
import torch
import torch.nn as nn
from torch.nn import functional as F

from gptlab.core.attention import AttentionBackend
from gptlab.core.config import ModelConfig
from gptlab.core.errors import ConfigError
from gptlab.core.generation import generate as _generate
from gptlab.core.layer_kernels import LayerKernels
from gptlab.core.matmuls import Matmul
from gptlab.core.selection import Implementation, Request


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


# --------------------------------------------------------------------------- parts
class Norm(nn.Module):
    """A normalisation over the last dim: ``(..., ndim) -> (..., ndim)``, built as
    ``cls(ndim, bias=...)``; ``--norm`` chooses the one every block and the final norm use. A
    norm computed by the layer kernels (LayerNorm) sets ``uses_layer_kernels`` and is also given
    the model's: ``cls(ndim, bias=..., kernels=...)``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    uses_layer_kernels: ClassVar[bool] = False

    def __init__(self, ndim: int | None = None, bias: bool = True, eps: float = 1e-5):
        super().__init__()  # (the arguments are the subclass's: super().__init__() will do)


class FeedForward(nn.Module):
    """The position-wise MLP of a block: ``(B, T, C) -> (B, T, C)``, built as ``cls(config)``;
    ``--mlp`` chooses the one every block uses. Its last Linear writes into the residual stream
    and is named ``c_proj`` (so GPT-2's init scales it, and ``--zero-init`` zeroes it). An MLP
    computed in part by the layer kernels (the GELU MLP's bias + GELU) sets
    ``uses_layer_kernels`` and is also given the model's: ``cls(config, kernels=...)``; one
    whose Linear layers are :class:`gptlab.nn.Linear` sets ``uses_matmul`` and is given the
    model's matrix products: ``cls(config, matmul=...)``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    uses_layer_kernels: ClassVar[bool] = False
    uses_matmul: ClassVar[bool] = False

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()  # (the config is the subclass's: super().__init__() will do)


class PositionScheme:
    """How a transformer knows where each token is (``--position``).

    ``learned_table``: the model adds a learned (block_size, C) table to the token embeddings
    (GPT-2). :meth:`qk_module` returns a module for the attention's position seam
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


@attrs.frozen
class Components:
    """The parts a model is built from, chosen by name through the registry, and the factories
    its blocks build their norms and MLPs with. A model without attention (the bigram) gets
    only ``kernels``."""

    block: type[Block] | None = None  # --block
    attention: AttentionBackend | None = None  # --attention
    norm_class: type[Norm] | None = None  # --norm
    mlp_class: type[FeedForward] | None = None  # --mlp
    position: type[PositionScheme] | None = None  # --position
    kernels: LayerKernels | None = None  # --kernels: LayerNorm, bias + GELU, the loss
    matmul: Matmul | None = None  # --matmul: the Linear layers' products (None: F.linear)
    decoder: type[Decoder] | None = None  # a fused step for cached decoding, or None

    def norm(self, ndim: int, bias: bool = True) -> Norm:
        """A new norm of the chosen kind over ``ndim`` features."""
        return self._build(self.norm_class, "norm", ndim, bias=bias)

    def mlp(self, config: ModelConfig) -> FeedForward:
        """A new MLP of the chosen kind for a block of ``config``."""
        return self._build(self.mlp_class, "MLP", config)

    def _build(self, cls, what: str, *args, **kwargs):
        if cls is None:
            raise ConfigError(f"no {what} was chosen for this model; build it with "
                              f"gptlab.core.planning.build_model, or give Components a "
                              f"{what} class")
        if cls.uses_layer_kernels:
            kwargs["kernels"] = self.kernels
        if getattr(cls, "uses_matmul", False):
            kwargs["matmul"] = self.matmul
        return cls(*args, **kwargs)


# --------------------------------------------------------------------------- models
class Block(nn.Module):
    """A transformer block: ``(B, T, C) -> (B, T, C)``, built as ``cls(config, components)``: it
    builds its own norms and MLP (``components.norm(C)``, ``components.mlp(config)``) and its
    attention (:class:`gptlab.nn.MultiHeadAttention` with ``components.attention`` and
    ``components.position``).

    Blocks that set ``supports_kv_cache = True`` accept ``forward(x, kv_cache)`` and pass the
    cache to their attention (see :class:`gptlab.nn.MultiHeadAttention`); others make
    generation recompute.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    supports_kv_cache: ClassVar[bool] = False

    def __init__(self, config: ModelConfig | None = None,
                 components: Components | None = None):
        super().__init__()  # (the arguments are the subclass's: super().__init__() will do)


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
        # the layer kernels compute the loss (None: F.cross_entropy)
        self.kernels = None if components is None else components.kernels

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def loss(self, logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
        """Mean cross-entropy; computed by the model's layer kernels if it has some."""
        if targets is None:
            return None
        logits, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
        if self.kernels is not None:
            return self.kernels.cross_entropy(logits, targets)
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


# --------------------------------------------------------------------------- decoding
@attrs.frozen(kw_only=True)
class DecodeRequest(Request):
    """What cached decoding of a model asks of a fused decoder: the device and dtype of the
    model's weights, and what the model is built from."""

    model: type[LanguageModel]
    config: ModelConfig
    components: Components

    def describe(self) -> str:
        c = self.components
        parts = [super().describe(), f"model {self.model.name}"]
        if c.block is not None:
            parts += [f"block {c.block.name}", f"attention {c.attention.name}",
                      f"norm {c.norm_class.name}", f"mlp {c.mlp_class.name}",
                      f"position {c.position.name}"]
        if c.kernels is not None:
            parts.append(f"kernels {c.kernels.name}")
        return ", ".join(parts)


class Decoder(Implementation):
    """A fused decoding step: the whole model for one new token per sequence, in one call
    (``register_decoders``). Chosen when the model is built, among those whose
    ``not_supported_reasons(DecodeRequest)`` is empty (none fits: the model decodes op by op);
    made per generation window as ``cls(model)``. ``decoder(idx, cache)`` takes the new tokens
    (B, 1) and the model's KV cache, appends every layer's keys and values (advancing each layer
    of the cache) and returns the logits (B, 1, vocab), or None to decline that step (the model
    then runs it op by op)."""

    def __init__(self, model: LanguageModel):
        self.model = model

    def __call__(self, idx: torch.Tensor, cache) -> torch.Tensor | None:
        return None

