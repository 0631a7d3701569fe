"""Training-speed benchmark (``gpt bench train``): whole optimiser steps of a preset's model, in
variants measured in the same run.

Each variant (dtype, torch.compile, attention backend, layer kernels, matmul, features turned
off) is a :class:`~gptlab.core.trainer.Trainer` on the same text, seed and batches, in a process
of its own (``python -m gptlab.bench.train``), so that nothing one variant sets up (a
compilation, a kernel's threads, a cache, a switch) reaches another. After each variant's
warm-up (which includes compilation), the variants run in interleaved rounds (round 1 of every
variant, then round 2, ...; one process runs at a time), so a machine that slows down mid-run
slows every variant alike; the result is the median tokens/s over the rounds, and its ratio to
the first variant (the baseline) is the median of the rounds' ratios.

A *peer* is another implementation of the same model given by path: nanoGPT's ``model.py``
(``GPTConfig``, ``GPT(config)``, ``forward(idx, targets) -> (logits, loss)``; fetch it yourself,
it is not shipped). Variants ``peer`` and ``peer+compile`` build it with the preset's config and
train it as nanoGPT does: its own ``configure_optimizers`` (AdamW, fused on CUDA only) where it
has one, with the same schedule, gradient clipping and batches as gptlab's model.

Features a variant can turn off (``~name``), to measure what each buys in the same run:
``~fused-adamw`` (AdamW's per-parameter for-loop instead of its fused step), ``~packed-grads``
(the q, k, v gradients of the flash backward written apart and concatenated, as ``split`` would)
and ``~keep-freed-memory`` (glibc's malloc left as it is, :mod:`gptlab.core.malloc`). A variant
``DTYPE:MATMUL`` names the Linear layers' products (``float32:torch``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import attrs

from gptlab.core.errors import ConfigError, GptlabError

#: What ``~name`` turns off in a variant's process: (module, attribute) set to False.
FEATURES = {
    "fused-adamw": ("gptlab.core.optimizers", "AdamWRecipe.fused"),
    "packed-grads": ("gptlab.plugins.cuda_kernels.ops", "PACK_QKV_GRADIENTS"),
    "keep-freed-memory": ("gptlab.core.malloc", "ENABLED"),
}


@attrs.frozen
class Variant:
    name: str  # e.g. "float32", "bfloat16+compile"
    dtype: str = "auto"
    compile: bool = False
    attention: str | None = None  # None: the preset's (auto)
    peer: bool = False  # the peer model (--peer PATH) instead of gptlab's
    kernels: str | None = None  # layer kernels; None: the preset's (auto)
    off: tuple[str, ...] = ()  # FEATURES turned off
    matmul: str | None = None  # the Linear layers' products; None: the preset's (auto)

    @classmethod
    def parse(cls, spec: str) -> Variant:
        """``DTYPE[+compile][@BACKEND][/KERNELS][:MATMUL][~FEATURE...]``, e.g.
        ``bfloat16+compile@flash/native``, ``float32:torch`` or ``float32~fused-adamw``, or
        ``peer[+compile]`` (the peer model, float32)."""
        spec = spec.strip()
        head, *off = spec.split("~")
        head, _, matmul = head.partition(":")
        rest, _, kernels = head.partition("/")
        body, _, attention = rest.partition("@")
        dtype, _, flag = body.partition("+")
        unknown = [f for f in off if f not in FEATURES]
        if flag not in ("", "compile") or unknown or (
                dtype == "peer" and (attention or kernels or matmul or off)):
            raise ConfigError(f"variant {spec!r}: expected DTYPE[+compile][@BACKEND][/KERNELS]"
                              f"[:MATMUL][~FEATURE] (e.g. bfloat16+compile@flash/native, "
                              f"float32:torch, float32~fused-adamw; features: "
                              f"{', '.join(FEATURES)}) or peer[+compile]")
        if dtype == "peer":
            return cls(spec, "float32", flag == "compile", None, peer=True)
        return cls(spec, dtype or "auto", flag == "compile", attention or None,
                   kernels=kernels or None, off=tuple(off), matmul=matmul or None)


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
    """The peer model trained as its own code trains it, on the batches and learning-rate
    schedule of ``batches`` (a trainer of the same config and seed)."""

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
            configure = getattr(self.model, "configure_optimizers", None)
            self.optimizer = (configure(self.cfg.weight_decay, self.cfg.learning_rate,
                                        (self.cfg.beta1, self.cfg.beta2),
                                        batches.device.type)
                              if configure else make_optimizer(self.model, self.cfg))
        self.model.train()
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
    matmul: str | None
    dtype: str
    tokens_per_s: list[float]  # one per round

    @property
    def median(self) -> float:
        return statistics.median(self.tokens_per_s)

    def ratio_to(self, other: Result) -> float:
        """The median over rounds of this variant's speed over ``other``'s in the same round."""
        return statistics.median(a / b for a, b in zip(self.tokens_per_s, other.tokens_per_s))


# --------------------------------------------------------------------------- one variant's process
def _turn_off(features) -> None:
    import importlib

    for feature in features:
        module, attribute = FEATURES[feature]
        owner, _, name = attribute.rpartition(".")
        target = importlib.import_module(module)
        for part in filter(None, owner.split(".")):
            target = getattr(target, part)
        setattr(target, name, False)


def _worker(job: dict, reply: Callable[[dict], None]) -> None:
    """Set up one variant (``job``: the variant, preset, text path, steps), warm it up, then
    run ``steps`` steps per line read from stdin, replying with the seconds they took."""
    from gptlab.core.config import resolve_configs
    from gptlab.core.plugins import load_registry
    from gptlab.core.trainer import Trainer
    from gptlab.data.corpora import load_text

    v = Variant.parse(job["variant"])
    _turn_off(v.off)
    over = {"attention": "naive" if v.peer else v.attention, "kernels": v.kernels,
            "matmul": v.matmul}
    mc, tc = resolve_configs(job["preset"], over, {
        "dtype": v.dtype, "compile": v.compile and not v.peer, "device": job["device"],
        "max_iters": job["warmup"] + job["steps"] * job["rounds"] + 1})
    trainer = Trainer(load_registry(), mc, tc, load_text(job["text"]))
    if v.peer:  # the gptlab trainer of the same config supplies the batches
        trainer = PeerTrainer(load_peer(job["peer"]), trainer, v.compile)
    trainer.model.train()
    for _ in range(job["warmup"]):
        trainer.step()
    reply({"ready": True, "dtype": "float32" if v.peer else trainer.cfg.dtype,
           "attention": "peer" if v.peer else trainer.plan.attention_name,
           "kernels": None if v.peer else trainer.plan.kernels_name,
           "matmul": None if v.peer else trainer.plan.matmul_name,
           "tokens": job["steps"] * trainer.cfg.batch_size * trainer.model_config.block_size})
    for _ in sys.stdin:
        start = time.perf_counter()
        for _ in range(job["steps"]):
            trainer.step()
        reply({"seconds": time.perf_counter() - start})


class _Process:
    """A variant's worker process and its line protocol (JSON on its stdout)."""

    def __init__(self, job: dict):
        self.proc = subprocess.Popen([sys.executable, "-m", "gptlab.bench.train"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read().strip().splitlines()
            self.close()
            raise GptlabError(err[-1] if err else "a benchmark process ended without a word")
        return json.loads(line)

    def run(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self.read()["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run(text_path: str, variants: list[Variant], *, preset: str = "default", steps: int = 10,
        rounds: int = 3, warmup: int = 3, device: str | None = None, peer: str | None = None,
        on_progress: Callable[[str], None] | None = None) -> list[Result]:
    """Measure every variant, each in its own process; ``steps`` optimiser steps per round, after
    ``warmup`` steps. ``peer``: the path of the peer's ``model.py`` (needed by ``peer``
    variants)."""
    say = on_progress or (lambda msg: None)
    if any(v.peer for v in variants):
        if peer is None:
            raise ConfigError("a peer variant needs --peer PATH (nanoGPT's model.py)")
        load_peer(peer)  # its errors here, in one line, before any process starts
    procs, info = [], []
    try:
        for v in variants:
            say(f"warming up {v.name} ({warmup} steps{', compiling' if v.compile else ''})")
            procs.append(_Process({"variant": v.name, "preset": preset, "text": text_path,
                                   "device": device, "peer": peer, "steps": steps,
                                   "rounds": rounds, "warmup": warmup}))
            info.append(procs[-1].read())
        times: list[list[float]] = [[] for _ in variants]
        for r in range(rounds):
            say(f"round {r + 1}/{rounds}")
            for i, proc in enumerate(procs):
                times[i].append(proc.run())
    finally:
        for proc in procs:
            proc.close()
    return [Result(v, i["attention"], i["kernels"], i["matmul"], i["dtype"],
                   [i["tokens"] / t for t in ts]) for v, i, ts in zip(variants, info, times)]


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")  # the protocol's; prints go to stderr
    sys.stdout = sys.stderr

    def reply(message: dict) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    try:
        _worker(json.loads(sys.stdin.readline()), reply)
    except GptlabError as e:
        sys.stderr.write(f"{str(e).splitlines()[0]}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
