"""Training-speed benchmark: whole optimiser steps of a preset's model, in variants measured in
the same run.

Each variant (attention backend, dtype, torch.compile) is a :class:`~gptlab.core.trainer.Trainer`
on the same text, seed and batches. After a warm-up (which includes compilation), the variants
run in interleaved rounds (round 1 of every variant, then round 2, ...), so a machine that slows
down mid-run slows every variant alike; the result is the median tokens/s over the rounds and
its ratio to the first variant (the baseline).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import attrs

from gptlab.core.config import resolve_configs
from gptlab.core.errors import ConfigError


@attrs.frozen
class Variant:
    name: str  # e.g. "float32", "bfloat16+compile"
    dtype: str = "float32"
    compile: bool = False
    attention: str | None = None  # None: the preset's (auto)

    @classmethod
    def parse(cls, spec: str) -> Variant:
        """``DTYPE[+compile][@BACKEND]``, e.g. ``bfloat16+compile@flash``."""
        body, _, attention = spec.partition("@")
        dtype, _, flag = body.partition("+")
        if flag not in ("", "compile"):
            raise ConfigError(f"variant {spec!r}: expected DTYPE[+compile][@BACKEND], e.g. "
                              f"bfloat16+compile@flash")
        return cls(spec, dtype or "float32", flag == "compile", attention or None)


@attrs.frozen
class Result:
    variant: Variant
    attention: str | None
    tokens_per_s: list[float]  # one per round

    @property
    def median(self) -> float:
        return statistics.median(self.tokens_per_s)


def run(reg, text: str, variants: list[Variant], *, preset: str = "default", steps: int = 10,
        rounds: int = 3, warmup: int = 3, device: str | None = None,
        on_progress: Callable[[str], None] | None = None) -> list[Result]:
    """Measure every variant; ``steps`` optimiser steps per round, after ``warmup`` steps."""
    from gptlab.core.trainer import Trainer

    say = on_progress or (lambda msg: None)
    trainers = []
    for v in variants:
        over = {"attention": v.attention} if v.attention else {}
        mc, tc = resolve_configs(preset, over, {"dtype": v.dtype, "compile": v.compile,
                                                "max_iters": warmup + steps * rounds,
                                                "device": device})
        trainer = Trainer(reg, mc, tc, text)
        trainer.model.train()
        say(f"warming up {v.name} ({warmup} steps{', compiling' if v.compile else ''})")
        for _ in range(warmup):
            trainer.step()
        trainers.append(trainer)
    times: list[list[float]] = [[] for _ in variants]
    for r in range(rounds):
        say(f"round {r + 1}/{rounds}")
        for i, trainer in enumerate(trainers):
            start = time.perf_counter()
            for _ in range(steps):
                trainer.step()
            times[i].append(time.perf_counter() - start)
    results = []
    for v, trainer, ts in zip(variants, trainers, times):
        tokens = steps * trainer.cfg.batch_size * trainer.model_config.block_size
        results.append(Result(v, trainer.plan.attention_name, [tokens / t for t in ts]))
    return results
