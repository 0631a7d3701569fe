"""The interfaces plugins implement: Tokenizer, LanguageModel, Block and AttentionBackend.

Attention backends follow the xformers ``fmha`` pattern: each declares what it supports
(devices, dtypes, head dims, backward, dropout) and answers ``not_supported_reasons(request)``
in readable strings, so the dispatcher can pick one (``auto``) or explain why a named one cannot
run. Attention itself is scaled dot-product attention (Vaswani et al. 2017, "Attention Is All You
Need"): ``softmax(scale * Q K^T + causal mask) V``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import attrs
import torch
import torch.nn as nn
from torch.nn import functional as F

from gptlab.core.config import ModelConfig
from gptlab.core.errors import ConfigError


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


# --------------------------------------------------------------------------- attention
@attrs.frozen(kw_only=True)
class AttentionRequest:
    """What a model will ask of an attention backend; used for dispatch."""

    device: str = "cpu"  # torch device type: "cpu", "cuda", ...
    dtype: torch.dtype = torch.float32
    head_dim: int = 64
    q_len: int = 128
    k_len: int = 128
    causal: bool = True
    dropout_p: float = 0.0
    requires_grad: bool = True


def device_unavailable_reason(device_type: str) -> str | None:
    """Why torch cannot use devices of this type here (None if it can)."""
    if device_type == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None:
            return f"torch {torch.__version__} has no CUDA support (a CPU-only build)"
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU"
    if device_type == "mps" and not torch.backends.mps.is_available():
        return "the mps device is not available here"
    return None


class AttentionBackend:
    """Computes ``softmax(scale * q @ k^T [+ causal mask]) @ v`` on ``(B, n_head, T, head_dim)``.

    Subclasses set the capability attributes and implement :meth:`forward`. The default
    :meth:`not_supported_reasons` checks the declared capabilities; override
    :meth:`unavailable_reasons` for environment problems (library missing, compiler missing).

    With ``causal=True`` and fewer queries than keys (decoding with a KV cache), the mask is
    aligned bottom-right: query ``i`` sees keys ``j <= i + (k_len - q_len)``.
    """

    name: ClassVar[str]
    priority: ClassVar[int] = 0  # ``auto`` picks the highest priority that fits
    description: ClassVar[str] = ""
    devices: ClassVar[frozenset[str]] = frozenset({"cpu"})
    dtypes: ClassVar[frozenset[torch.dtype]] = frozenset({torch.float32})
    min_head_dim: ClassVar[int] = 1
    max_head_dim: ClassVar[int] = 1 << 16
    supports_backward: ClassVar[bool] = True
    supports_dropout: ClassVar[bool] = False
    supports_causal: ClassVar[bool] = True
    supports_non_causal: ClassVar[bool] = True
    supports_q_shorter_than_k: ClassVar[bool] = True  # bottom-right causal alignment
    deterministic: ClassVar[bool] = True

    @classmethod
    def is_deterministic(cls, device: str) -> bool:
        """Whether repeated calls on ``device`` give bit-identical results."""
        return cls.deterministic

    @classmethod
    def unavailable_reasons(cls, device: str) -> list[str]:
        """Why the backend cannot run at all on ``device`` here (missing library, compiler...)."""
        return []

    @classmethod
    def prepare(cls, request: AttentionRequest) -> None:
        """Called by dispatch before construction, for a request it supports: build or load what
        the request's device needs. A GptlabError here makes ``auto`` move on."""

    @classmethod
    def not_supported_reasons(cls, request: AttentionRequest) -> list[str]:
        """Readable reasons why ``request`` cannot be served; empty means supported."""
        r = []
        if request.device not in cls.devices:
            r.append(f"device {request.device!r} not supported (supports: "
                     f"{', '.join(sorted(cls.devices))})")
        if request.dtype not in cls.dtypes:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in cls.dtypes))
            r.append(f"dtype {str(request.dtype).replace('torch.', '')} not supported "
                     f"(supports: {names})")
        if not cls.min_head_dim <= request.head_dim <= cls.max_head_dim:
            r.append(f"head_dim {request.head_dim} outside [{cls.min_head_dim}, "
                     f"{cls.max_head_dim}]")
        if request.requires_grad and not cls.supports_backward:
            r.append("backward (training) not supported")
        if request.dropout_p > 0 and not cls.supports_dropout:
            r.append(f"attention dropout (p={request.dropout_p}) not supported")
        if request.causal and not cls.supports_causal:
            r.append("causal masking not supported")
        if not request.causal and not cls.supports_non_causal:
            r.append("non-causal attention not supported")
        if request.q_len != request.k_len and not cls.supports_q_shorter_than_k:
            r.append("query length different from key length (KV-cache decoding) not supported")
        if request.causal and request.q_len > request.k_len:
            r.append(f"causal attention with more queries ({request.q_len}) than keys "
                     f"({request.k_len}) is undefined")
        if request.device in cls.devices:
            missing = device_unavailable_reason(request.device)
            if missing:
                r.append(missing)
            r.extend(cls.unavailable_reasons(request.device))
        return r

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, q, k, v, **kwargs):
        return self.forward(q, k, v, **kwargs)

    def __repr__(self):
        return f"<attention backend {self.name!r}>"


def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """Boolean (q_len, k_len) mask, True where query i may see key j (bottom-right aligned)."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


# --------------------------------------------------------------------------- models
@attrs.frozen
class Components:
    """Swappable parts handed to a model's constructor, chosen by name through the registry."""

    block: type | None = None  # a Block subclass
    attention: AttentionBackend | None = None


class Block(nn.Module):
    """A transformer block: ``(B, T, C) -> (B, T, C)``. Built as ``cls(config, attention)``.

    Blocks that set ``supports_kv_cache = True`` accept ``forward(x, kv_cache)`` and pass the
    cache to their attention (see ``MultiHeadAttention``); others make generation recompute.
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

    def __init__(self, config: ModelConfig, components: Components):
        super().__init__()
        if config.vocab_size < 1:
            raise ConfigError("vocab_size must be set (from the tokenizer) before building a model")
        self.config = config

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
        if targets is None:
            return None
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    # ---- generation -------------------------------------------------------------------
    #: True if the model implements :meth:`new_cache` and :meth:`forward_cached`.
    supports_kv_cache: ClassVar[bool] = False

    def kv_cache_usable(self) -> bool:
        """Whether generation can use the KV cache (model and its attention backend allow it)."""
        return self.supports_kv_cache

    def new_cache(self):
        raise NotImplementedError

    def forward_cached(self, idx: torch.Tensor, cache) -> torch.Tensor:
        """Logits (B, T_new, vocab) for ``idx`` following the tokens already in ``cache``."""
        raise NotImplementedError

    @torch.inference_mode()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 on_token=None) -> torch.Tensor:
        """Append up to ``max_new_tokens`` sampled tokens to ``idx`` (B, T); returns (B, T + n).

        ``temperature=0`` is greedy decoding; ``top_k`` keeps the k likeliest tokens, ``top_p``
        the smallest set whose probability reaches p (nucleus sampling). ``on_token(next_ids)``
        is called after each step; returning ``False`` stops early.

        Context window: the model sees ``idx[:, start:]``. When that would exceed
        ``block_size``, ``start`` jumps so that the last ``block_size // 2`` tokens are kept
        (with the KV cache: the cache is dropped and those tokens recomputed). The same rule is
        used with and without the cache, so greedy outputs are identical either way.
        """
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
        if idx.dim() != 2 or idx.size(1) < 1:
            raise ConfigError("generate needs a (B, T) prompt with T >= 1 token")
        block, keep = self.config.block_size, max(1, self.config.block_size // 2)
        use_cache = use_cache and self.kv_cache_usable()
        start, cache = 0, None
        for _ in range(max_new_tokens):
            if idx.size(1) - start > block:
                start, cache = idx.size(1) - keep, None
            if not use_cache:
                logits, _ = self(idx[:, start:])
            elif cache is None:
                cache = self.new_cache()
                logits = self.forward_cached(idx[:, start:], cache)
            else:
                logits = self.forward_cached(idx[:, -1:], cache)
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat((idx, nxt), dim=1)
            if on_token is not None and on_token(nxt) is False:
                break
        return idx


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Pick the next token from ``logits`` (B, vocab); returns (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the likelier tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the first token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)
