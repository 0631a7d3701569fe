"""Sizing a request before the work starts, so that a size that cannot work is one line at once,
not minutes of work (or the memory of the machine) later.

- :func:`check_splits`: a run's block size against its text. Each split must hold one window of
  ``block_size + 1`` tokens. ``gpt run`` checks it as soon as the text is read (with the run's
  tokenizer), before the attention backends are timed at that size or anything is built;
  :func:`gptlab.data.batches.encode_splits` checks it again for library callers.
- :func:`check_attention_points`: the sequence lengths of ``gpt bench attention`` against the
  device's memory: each point holds q, k, v, the output and their gradients, and a backend that
  stores the (B, heads, T, T) scores (:attr:`AttentionBackend.stores_scores`) three of those
  (scores, probabilities, their gradient).

The model a run or a checkpoint builds is sized by :mod:`gptlab.core.memory` (a run) and
:func:`gptlab.core.checkpoint.check_model` (a checkpoint); generation grows its buffer as it
goes (:func:`gptlab.core.generation.generate`), so ``--tokens`` allocates nothing up front.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gptlab.core.errors import ConfigError, DataError
from gptlab.core.memory import GIB, available_bytes
from gptlab.data.corpora import split_ids


def split_sizes(n_tokens: int, val_fraction: float) -> tuple[int, int]:
    """(train, val) tokens of a text of ``n_tokens``: the first ``1 - val_fraction`` is train."""
    n_train = split_ids(n_tokens, val_fraction)
    return n_train, n_tokens - n_train


def check_splits(n_tokens: int, block_size: int, val_fraction: float) -> None:
    """A DataError unless both splits of a text of ``n_tokens`` hold ``block_size + 1``
    tokens."""
    for name, n in zip(("train", "val"), split_sizes(n_tokens, val_fraction)):
        if n < block_size + 1:
            raise DataError(
                f"the {name} split has {n} tokens, fewer than block_size + 1 = "
                f"{block_size + 1}; use a longer text or a smaller --block-size")


def attention_point_bytes(stores_scores: bool, B: int, H: int, T: int, D: int,
                          dtype: torch.dtype) -> int:
    """Bytes one forward+backward of causal attention on (B, H, T, D) holds: q, k, v, the
    output, the output's gradient and q, k, v's (8 tensors), and three float32 (B, H, T, T)
    tensors for a backend that stores the scores."""
    size = torch.empty((), dtype=dtype).element_size()
    return 8 * B * H * T * D * size + (3 * B * H * T * T * 4 if stores_scores else 0)


def check_attention_points(backends: Sequence[type], seq_lens: Sequence[int], *, B: int, H: int,
                           D: int, dtype: torch.dtype, device: torch.device) -> None:
    """A ConfigError naming the backends and the largest T whose point cannot fit in
    ``device``'s memory (nothing is run)."""
    have = available_bytes(device)
    if have is None or not seq_lens:
        return
    T = max(seq_lens)
    over = [(cls.name, attention_point_bytes(getattr(cls, "stores_scores", True), B, H, T, D,
                                             dtype)) for cls in backends]
    over = [(name, need) for name, need in over if need > have]
    if over:
        names = ", ".join(name for name, _ in over)
        need = max(need for _, need in over)
        raise ConfigError(
            f"--seq-lens {T} needs about {need / GIB:,.1f} GiB for {names} (B={B}, H={H}, "
            f"D={D}) but {device.type} has {have / GIB:,.1f} GiB available; lower --seq-lens "
            f"or --batch, or leave {names} out with --backends")
