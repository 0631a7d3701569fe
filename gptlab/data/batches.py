"""From text to training batches: encode and split the text, draw random windows.

As nanoGPT: the first ``1 - val_fraction`` of the encoded text is train, the rest val; a batch
is ``B`` random windows of ``T + 1`` tokens, ``x`` the first ``T`` and ``y`` the last ``T``.
"""

from __future__ import annotations

import attrs
import torch

from gptlab.core.sizing import check_splits
from gptlab.data.corpora import split_ids


@attrs.define
class Splits:
    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64


def encode_splits(text: str, tokenizer, val_fraction: float, block_size: int) -> Splits:
    """Encode ``text`` and split it: first ``1 - val_fraction`` train, the rest val."""
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    check_splits(len(ids), block_size, val_fraction)
    n = split_ids(len(ids), val_fraction)
    return Splits(train=ids[:n], val=ids[n:])


def draw_starts(data: torch.Tensor, batch_size: int, block_size: int,
                generator: torch.Generator) -> torch.Tensor:
    """Start positions (B,) of ``batch_size`` random windows of ``block_size + 1`` tokens."""
    return torch.randint(len(data) - block_size, (batch_size,), generator=generator)


def windows(data: torch.Tensor, starts: torch.Tensor,
            block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (B, T) from ``starts``, and ``y``: ``x`` shifted by one token."""
    offsets = torch.arange(block_size + 1)
    chunk = data[starts[:, None] + offsets]  # (B, T + 1)
    return chunk[:, :-1], chunk[:, 1:]


def get_batch(data: torch.Tensor, batch_size: int, block_size: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: ``x`` is (B, T), ``y`` is ``x`` shifted by one token."""
    return windows(data, draw_starts(data, batch_size, block_size, generator), block_size)
