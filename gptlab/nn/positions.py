"""Position schemes: how a transformer knows where each token is.

- ``learned``: a learned (block_size, C) table added to the token embeddings (GPT-2, Radford et
  al. 2019).
- ``rotary``: rotary position embeddings (Su et al. 2021, "RoFormer"): each pair of dimensions of
  every query and key is rotated by an angle proportional to the token's position, with a
  frequency per pair (``base^(-2i/hs)``), so ``q_m . k_n`` depends on ``m - n`` only and the
  model has no position table. Applied at the attention's position seam, after the KV cache's
  offset is added, so decoding with the cache gives the same positions as without it.
- ``none``: no position information at all (NoPE: a causal mask alone lets a decoder infer
  positions, Haviv et al. 2022).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gptlab.core.errors import ConfigError
from gptlab.core.interfaces import PositionScheme
from gptlab.nn.norms import QKNorm


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[..., i], x[..., i + hs/2]) of x (..., T, hs) by the angles whose
    cosines and sines are cos, sin (T, hs/2)."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]  # (..., T, hs/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Rotary(nn.Module):
    """A position-seam module: ``q, k, pos -> rotate(q), rotate(k)`` (Su et al. 2021).

    The cosines and sines of every position below ``max_len`` (the model's block_size: no
    position, cached or not, reaches it) are computed once, in double and stored as float32
    buffers that checkpoints do not hold."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ConfigError(f"rotary position embeddings need an even head dim, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)  # (hs/2,)
        cos, sin = self._angles(torch.arange(max_len))
        self.register_buffer("cos", cos, persistent=False)  # (max_len, hs/2)
        self.register_buffer("sin", sin, persistent=False)

    def _angles(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = pos.to(self.inv_freq.device, torch.float64)[:, None] * \
            self.inv_freq.double()[None, :]  # (T, hs/2), in double: exact for long contexts
        return angles.cos().float(), angles.sin().float()

    def forward(self, q, k, pos):  # q, k (B, nh, T, hs); pos (T,) int64, each < max_len
        cos, sin = self.cos[pos].to(q.dtype), self.sin[pos].to(q.dtype)  # (T, hs/2)
        return rotate(q, cos, sin), rotate(k, cos, sin)


class QKChain(nn.Module):
    """Several position-seam modules applied in order (e.g. QK-norm, then rotary)."""

    def __init__(self, *modules: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, q, k, pos):
        for part in self.parts:
            q, k = part(q, k, pos)
        return q, k


def qk_seam(config, position: type[PositionScheme] | None) -> nn.Module | None:
    """The module for an attention's position seam: QK-norm (``config.qk_norm``), then the
    position scheme's own (rotary), chained; None if neither applies."""
    parts = [QKNorm()] if config.qk_norm else []
    own = None if position is None else position.qk_module(config)
    parts += [own] if own is not None else []
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else QKChain(*parts)


class LearnedPositions(PositionScheme):
    name = "learned"
    description = "a learned (block_size, C) table added to the token embeddings (GPT-2)"
    learned_table = True


class RotaryPositions(PositionScheme):
    name = "rotary"
    description = "rotary embeddings on q and k (Su et al. 2021); no position table"

    @classmethod
    def check(cls, config):
        if config.head_dim % 2:
            raise ConfigError(f"--position rotary needs an even head dim (n_embd / n_head), got "
                              f"{config.head_dim}; change --n-embd or --n-head")

    @classmethod
    def qk_module(cls, config):
        return Rotary(config.head_dim, config.block_size)


class NoPositions(PositionScheme):
    name = "none"
    description = "no position information but the causal mask (NoPE, Haviv et al. 2022)"
