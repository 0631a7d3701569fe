"""Generation benchmark (``gpt bench generate``): greedy decoding speed with and without the KV
cache, in interleaved rounds, and whether every output is the same.

Each round decodes ``tokens`` tokens without the cache, then with it (wall time of
``model.generate``, temperature 0); the speeds reported are the medians over the rounds, and the
speed-up is the median of each round's own ratio (a round's two runs see the same machine: the
ratio of two medians taken apart can pair a fast round with a slow one).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import attrs


@attrs.frozen
class GenerateResult:
    tokens: int
    without_cache: list[float]  # tokens/s, one per round
    with_cache: list[float]
    identical: bool  # every output equals the first

    @property
    def median_without(self) -> float:
        return statistics.median(self.without_cache)

    @property
    def median_with(self) -> float:
        return statistics.median(self.with_cache)

    @property
    def speedup(self) -> float:
        """The median over the rounds of (with the cache) / (without it)."""
        return statistics.median(on / off for off, on in zip(self.without_cache,
                                                             self.with_cache))


def run(model, idx, tokens: int, rounds: int = 3,
        on_round: Callable[[int, float, float], None] | None = None) -> GenerateResult:
    """Decode ``tokens`` after ``idx`` (B, T) ``rounds`` times each way; ``on_round(r, without,
    with_)`` after each round (tokens/s)."""
    import torch

    outs, speeds = [], {False: [], True: []}
    for r in range(rounds):
        for use_cache in (False, True):
            t0 = time.perf_counter()
            outs.append(model.generate(idx, tokens, temperature=0, use_cache=use_cache))
            speeds[use_cache].append(tokens / (time.perf_counter() - t0))
        if on_round:
            on_round(r, speeds[False][-1], speeds[True][-1])
    return GenerateResult(tokens, speeds[False], speeds[True],
                          all(torch.equal(outs[0], o) for o in outs))
