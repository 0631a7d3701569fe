"""Evaluation: a quick loss estimate on fixed random batches, and the exact loss of a split.

:func:`estimate_loss` is what training reports (nanoGPT's ``estimate_loss``: the mean over a
fixed set of random batches, the same each time, so the curve is no noisier than the model).
:func:`evaluate_split` is ``gpt eval``: the mean cross-entropy over every token of a split.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch.nn import functional as F

from gptlab.data.batches import get_batch


class EvaluationStopped(Exception):
    """``should_stop()`` answered True between two batches (Ctrl-C or SIGTERM)."""


@torch.no_grad()
def estimate_loss(model, data: torch.Tensor, *, iters: int, batch_size: int, block_size: int,
                  seed: int, device: torch.device,
                  should_stop: Callable[[], bool] | None = None, autocast=None,
                  part: tuple[int, int] = (0, 1)) -> float:
    """Mean loss over ``iters`` batches drawn with a fixed ``seed`` (the same batches each time).

    ``part = (rank, size)``: this process computes batches ``rank, rank + size, ...`` and returns
    their share of the mean (the shares of every rank sum to it). ``should_stop`` is asked
    before each batch; True raises :class:`EvaluationStopped`. ``autocast``: a context for the
    forward passes (mixed precision)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    rank, size = part
    total = 0.0
    for i in range(iters):
        if should_stop is not None and should_stop():
            raise EvaluationStopped
        x, y = get_batch(data, batch_size, block_size, gen)  # every batch drawn, in order
        if i % size != rank:
            continue
        with autocast or contextlib.nullcontext():
            _, loss = model(x.to(device), y.to(device))
        total += loss.item()
    model.train(was_training)
    return total / iters


@torch.no_grad()
def evaluate_split(model, ids: torch.Tensor, *, batch_size: int = 32,
                   on_progress: Callable[[int, int], None] | None = None) -> tuple[float, int]:
    """Mean cross-entropy over *every* token of ``ids`` (deterministic, no sampling).

    ``ids`` is cut into consecutive windows of ``block_size``; each window predicts its next
    tokens, so every token but the first is predicted exactly once. Returns (loss, count).
    """
    model.eval()
    T = model.config.block_size
    device = next(model.parameters()).device
    n = len(ids) - 1  # tokens that have a next token
    starts = list(range(0, n, T))
    total = 0.0

    def add(xs: torch.Tensor, ys: torch.Tensor) -> float:
        logits, _ = model(xs.to(device))
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), ys.to(device).reshape(-1),
                               reduction="sum").item()

    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        full = [s for s in chunk if s + T <= n]
        if full:
            total += add(torch.stack([ids[s:s + T] for s in full]),
                         torch.stack([ids[s + 1:s + T + 1] for s in full]))
        if len(full) < len(chunk):  # only the very last window can be shorter
            s = chunk[-1]
            total += add(ids[s:n].unsqueeze(0), ids[s + 1:n + 1].unsqueeze(0))
        if on_progress:
            on_progress(min(i + batch_size, len(starts)), len(starts))
    return total / n, n
