"""Training-speed benchmark (``gpt bench train``): whole optimiser steps of a preset's model, in
variants measured in the same run.

Each variant (attention backend, dtype, torch.compile) is a :class:`~gptlab.core.trainer.Trainer`
on the same text, seed and batches. After a warm-up (which includes compilation), the variants
run in interleaved rounds (round 1 of every variant, then round 2, ...), so a machine that slows
down mid-run slows every variant alike; the result is the median tokens/s over the rounds and
its ratio to the first variant (the baseline).

A *peer* is another implementation of the same model given by path: nanoGPT's ``model.py``
(``GPTConfig``, ``GPT(config)``, ``forward(idx, targets) -> (logits, loss)``; fetch it yourself,
it is not shipped). Variants ``peer`` and ``peer+compile`` build it with the preset's config and
train it with the same optimiser, schedule, gradient clipping and batches as gptlab's model, so
the ratio compares the models, nothing else.
"""

from __future__ import annotations

import contextlib
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import attrs

from gptlab.core.config import resolve_configs
from gptlab.core.errors import ConfigError


@attrs.frozen
class Variant:
    name: str  # e.g. "float32", "bfloat16+compile"
    dtype: str = "float32"
    compile: bool = False
    attention: str | None = None  # None: the preset's (auto)
    peer: bool = False  # the peer model (--peer PATH) instead of gptlab's
    kernels: str | None = None  # layer kernels; None: the preset's (auto)

    @classmethod
    def parse(cls, spec: str) -> Variant:
        """``DTYPE[+compile][@BACKEND][/KERNELS]``, e.g. ``bfloat16+compile@flash/native``, or
        ``peer[+compile]`` (the peer model, float32)."""
        rest, _, kernels = spec.partition("/")
        body, _, attention = rest.partition("@")
        dtype, _, flag = body.partition("+")
        if flag not in ("", "compile") or (dtype == "peer" and (attention or kernels)):
            raise ConfigError(f"variant {spec!r}: expected DTYPE[+compile][@BACKEND][/KERNELS] "
                              f"(e.g. bfloat16+compile@flash/native) or peer[+compile]")
        if dtype == "peer":
            return cls(spec, "float32", flag == "compile", None, peer=True)
        return cls(spec, dtype or "float32", flag == "compile", attention or None,
                   kernels=kernels or None)


def load_peer(path: str | Path):
    """Import the peer's ``model.py`` from ``path``; it must define ``GPTConfig`` and ``GPT``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--peer {path}: no such file; give the path of nanoGPT's model.py")
    spec = importlib.util.spec_from_file_location("gptlab_peer_model", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"--peer {path}: importing it failed: {type(e).__name__}: {e}") from e
    missing = [n for n in ("GPTConfig", "GPT") if not hasattr(module, n)]
    if missing:
        raise ConfigError(f"--peer {path}: defines no {' or '.join(missing)}; expected "
                          f"nanoGPT's model.py")
    return module


class PeerTrainer:
    """The peer model trained like a :class:`~gptlab.core.trainer.Trainer`: ``batches`` (a
    trainer of the same config and seed) supplies the batches and the learning rate."""

    def __init__(self, module, batches, compile: bool):
        import torch

        from gptlab.core.trainer import make_optimizer

        mc, self.cfg, self.batches = batches.model_config, batches.cfg, batches
        self.model_config = mc
        conf = module.GPTConfig(block_size=mc.block_size, vocab_size=mc.vocab_size,
                                n_layer=mc.n_layer, n_head=mc.n_head, n_embd=mc.n_embd,
                                dropout=mc.dropout, bias=mc.bias)
        torch.manual_seed(self.cfg.seed)
        with contextlib.redirect_stdout(sys.stderr):  # nanoGPT prints its parameter count
            self.model = module.GPT(conf).to(batches.device)
        self.model.train()
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.forward = torch.compile(self.model) if compile else self.model
        self.step_count = 0

    def step(self) -> float:
        import torch

        for group in self.optimizer.param_groups:
            group["lr"] = self.batches.lr(self.step_count)
        self.optimizer.zero_grad(set_to_none=True)
        (x, y), = self.batches.next_batches()
        _, loss = self.forward(x.contiguous(), y.contiguous())  # nanoGPT views its targets
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.step_count += 1
        return loss.item()


@attrs.frozen
class Result:
    variant: Variant
    attention: str | None
    kernels: str | None
    tokens_per_s: list[float]  # one per round

    @property
    def median(self) -> float:
        return statistics.median(self.tokens_per_s)


def run(reg, text: str, variants: list[Variant], *, preset: str = "default", steps: int = 10,
        rounds: int = 3, warmup: int = 3, device: str | None = None, peer: str | None = None,
        on_progress: Callable[[str], None] | None = None) -> list[Result]:
    """Measure every variant; ``steps`` optimiser steps per round, after ``warmup`` steps.
    ``peer``: the path of the peer's ``model.py`` (needed by ``peer`` variants)."""
    from gptlab.core.trainer import Trainer

    say = on_progress or (lambda msg: None)
    module = None
    if any(v.peer for v in variants):
        if peer is None:
            raise ConfigError("a peer variant needs --peer PATH (nanoGPT's model.py)")
        module = load_peer(peer)
    trainers = []
    for v in variants:
        over = {"attention": v.attention} if v.attention else {}
        if v.kernels:
            over["kernels"] = v.kernels
        if v.peer:  # a gptlab trainer of the same config supplies the batches
            over["attention"] = "naive"
        mc, tc = resolve_configs(preset, over, {"dtype": v.dtype,
                                                "compile": v.compile and not v.peer,
                                                "max_iters": warmup + steps * rounds,
                                                "device": device})
        trainer = Trainer(reg, mc, tc, text)
        if v.peer:
            trainer = PeerTrainer(module, trainer, v.compile)
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
        attention = "peer" if v.peer else trainer.plan.attention_name
        kernels = None if v.peer else trainer.plan.layer_kernels.name
        results.append(Result(v, attention, kernels, [tokens / t for t in ts]))
    return results
