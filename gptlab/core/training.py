"""Training: data split and batching, the optimisation loop, evaluation and the final sample.

The loop is nanoGPT's: random windows of ``block_size + 1`` tokens, AdamW (weight decay on
matrices only), linear warmup then cosine decay of the learning rate (Loshchilov & Hutter 2017),
gradient clipping. Train and val losses are estimated every ``eval_interval`` steps on a fixed
set of batches, so the curve is not noisier than the model. Progress is reported through an
``on_event`` callback; the CLI turns it into a progress bar (library code never prints).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import torch
from torch.nn import functional as F

from gptlab.core.build import build_model, resolve_device
from gptlab.core.checkpoint import BEST_FILENAME, FILENAME, save_checkpoint
from gptlab.core.config import ModelConfig, TrainConfig
from gptlab.core.errors import CheckpointError, DataError, GptlabError
from gptlab.core.interfaces import LanguageModel, Tokenizer
from gptlab.core.plugins import Registry
from gptlab.data.corpora import split_ids

log = logging.getLogger(__name__)


@attrs.frozen
class TrainEvent:
    """``kind`` is ``"step"`` (after an optimiser step) or ``"eval"`` (after an estimate)."""

    kind: str
    step: int
    max_iters: int
    loss: float | None = None  # training loss of this step's batch
    lr: float | None = None
    tokens_per_s: float | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    elapsed: float = 0.0


@attrs.define
class TrainResult:
    model: LanguageModel
    tokenizer: Tokenizer
    model_config: ModelConfig
    train_config: TrainConfig
    history: list[dict]
    train_loss: float
    val_loss: float
    elapsed: float
    tokens_per_s: float
    checkpoint: Path | None
    attention: str | None


@attrs.define
class Splits:
    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64


def encode_splits(text: str, tokenizer: Tokenizer, val_fraction: float, block_size: int) -> Splits:
    """Encode ``text`` and split it: first ``1 - val_fraction`` train, the rest val."""
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    n = split_ids(len(ids), val_fraction)
    splits = Splits(train=ids[:n], val=ids[n:])
    for name, part in (("train", splits.train), ("val", splits.val)):
        if len(part) < block_size + 1:
            raise DataError(
                f"the {name} split has {len(part)} tokens, fewer than block_size + 1 = "
                f"{block_size + 1}; use a longer text or a smaller --block-size"
            )
    return splits


def get_batch(data: torch.Tensor, batch_size: int, block_size: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: ``x`` is (B, T), ``y`` is ``x`` shifted by one token."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    offsets = torch.arange(block_size + 1)
    chunk = data[ix[:, None] + offsets]  # (B, T + 1)
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def estimate_loss(model: LanguageModel, data: torch.Tensor, *, iters: int, batch_size: int,
                  block_size: int, seed: int, device: torch.device) -> float:
    """Mean loss over ``iters`` batches drawn with a fixed ``seed`` (the same batches each time)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(iters):
        x, y = get_batch(data, batch_size, block_size, gen)
        _, loss = model(x.to(device), y.to(device))
        total += loss.item()
    model.train(was_training)
    return total / iters


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``learning_rate``, then cosine decay to ``min_lr_ratio * learning_rate``."""
    lr, min_lr = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if step < cfg.warmup_iters:
        return lr * (step + 1) / cfg.warmup_iters
    span = max(1, cfg.max_iters - cfg.warmup_iters)
    progress = min(1.0, (step - cfg.warmup_iters) / span)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


class TrainingInterrupted(GptlabError):
    """Ctrl-C during training: the state was checkpointed first (``checkpoint``, ``step``)."""

    def __init__(self, step: int, checkpoint: Path | None):
        where = (f"checkpoint saved to {checkpoint}; continue with `gpt run --resume "
                 f"{checkpoint.parent}`" if checkpoint else "nothing saved (no --out-dir)")
        super().__init__(f"interrupted after step {step}; {where}")
        self.step, self.checkpoint = step, checkpoint


class _SigintFlag:
    """While active, the first Ctrl-C only sets a flag (checked between steps, so the saved
    state is consistent); a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.set, self._old = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True
        signal.signal(signal.SIGINT, self._old or signal.default_int_handler)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class MetricsLog:
    """Append-only JSON-lines log of a run (``metrics.jsonl`` in the run folder)."""

    FILENAME = "metrics.jsonl"

    def __init__(self, out_dir: Path | None, resume_step: int | None = None):
        self.path = None if out_dir is None else Path(out_dir) / self.FILENAME
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():  # drop records past the checkpoint
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= resume_step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, self.path)

    def write(self, **record) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def train(reg: Registry, model_config: ModelConfig, train_config: TrainConfig, text: str, *,
          out_dir: str | Path | None = None,
          on_event: Callable[[TrainEvent], None] | None = None,
          resume: dict | None = None, data_source: str | None = None,
          log_interval: int = 10) -> TrainResult:
    """Fit a tokenizer on ``text``, build the model, train it, evaluate, and save checkpoints.

    With ``out_dir``: ``ckpt.pt`` (latest, resumable) and ``best.pt`` (lowest val loss) are
    written at every evaluation and at the end, and ``metrics.jsonl`` logs the run. ``resume``
    is a checkpoint dict (from :func:`~gptlab.core.checkpoint.load_checkpoint`) to continue
    bit-exactly: model, optimizer, step, RNG states and data position are restored. Ctrl-C
    saves ``ckpt.pt`` after the current step and raises :class:`TrainingInterrupted`.
    The final losses are estimated on ``final_eval_iters`` fixed batches of each split.
    """
    cfg = train_config
    emit = on_event or (lambda event: None)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    out_dir = None if out_dir is None else Path(out_dir)

    tok_cls = reg.tokenizer(cfg.tokenizer)
    if resume is not None:
        tokenizer = tok_cls.from_state(resume["tokenizer"]["state"])
    else:
        tokenizer = tok_cls()
        tokenizer.train(text)
    model_config = attrs.evolve(model_config, vocab_size=tokenizer.vocab_size)
    splits = encode_splits(text, tokenizer, cfg.val_fraction, model_config.block_size)
    model = build_model(reg, model_config, device)
    attention = getattr(getattr(model, "attention_backend", None), "name", None)
    log.info("model %s: %.2fM parameters, attention %s", model_config.model,
             model.num_parameters() / 1e6, attention)
    optimizer = make_optimizer(model, cfg)
    batch_gen = torch.Generator().manual_seed(cfg.seed)
    T, B = model_config.block_size, cfg.batch_size
    start_step, history, best_val, elapsed_before = 0, [], math.inf, 0.0
    if resume is not None:
        st = resume.get("train_state")
        if not st:
            raise CheckpointError("this checkpoint has no training state to resume from")
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(st["optimizer"])
        batch_gen.set_state(st["batch_rng"])
        torch.set_rng_state(st["torch_rng"])
        start_step, best_val, elapsed_before = st["step"], st["best_val"], st["elapsed"]
        history = list(resume["metrics"].get("history", []))
        data_source = data_source or st.get("data_source")
    metrics_log = MetricsLog(out_dir, start_step if resume is not None else None)

    def evaluate(iters):
        kw = dict(iters=iters, batch_size=B, block_size=T, device=device, seed=cfg.seed + 1)
        return (estimate_loss(model, splits.train, **kw), estimate_loss(model, splits.val, **kw))

    def save(step, elapsed, tr=None, va=None):
        nonlocal best_val
        if out_dir is None:
            return None
        improved = va is not None and va < best_val
        best_val = va if improved else best_val
        state = {"step": step, "optimizer": optimizer.state_dict(),
                 "batch_rng": batch_gen.get_state(), "torch_rng": torch.get_rng_state(),
                 "best_val": best_val, "elapsed": elapsed, "data_source": data_source}
        metrics = {"train_loss": tr, "val_loss": va, "elapsed": elapsed, "step": step,
                   "attention": attention, "history": history}
        kw = dict(model=model, model_config=model_config, train_config=cfg, tokenizer=tokenizer,
                  metrics=metrics, train_state=state)
        path = save_checkpoint(out_dir / FILENAME, **kw)
        if improved:
            save_checkpoint(out_dir / BEST_FILENAME, **kw)
        return path

    model.train()
    t_start = time.perf_counter() - elapsed_before
    t_window, tokens_window, tokens_per_s = time.perf_counter(), 0, 0.0
    trained_steps, t_loop = 0, time.perf_counter()
    with _SigintFlag() as interrupt:
        for step in range(start_step, cfg.max_iters):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = get_batch(splits.train, B, T, batch_gen)
            _, loss = model(x.to(device), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            trained_steps += 1

            tokens_window += B * T
            now = time.perf_counter()
            if now - t_window > 0.5:
                tokens_per_s = tokens_window / (now - t_window)
                t_window, tokens_window = now, 0
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise DataError(f"training diverged at step {step} (loss {loss_value}); lower "
                                f"--lr")
            done = step + 1
            emit(TrainEvent("step", done, cfg.max_iters, loss=loss_value, lr=lr,
                            tokens_per_s=tokens_per_s, elapsed=now - t_start))
            if done % log_interval == 0:
                metrics_log.write(kind="step", step=done, train_loss=loss_value, lr=lr,
                                  tokens_per_s=tokens_per_s, elapsed=now - t_start)
            if done % cfg.eval_interval == 0 and done != cfg.max_iters:
                tr, va = evaluate(cfg.eval_iters)
                elapsed = time.perf_counter() - t_start
                history.append({"step": done, "train_loss": tr, "val_loss": va, "lr": lr,
                                "elapsed": elapsed})
                metrics_log.write(kind="eval", **history[-1])
                save(done, elapsed, tr, va)
                emit(TrainEvent("eval", done, cfg.max_iters, train_loss=tr, val_loss=va,
                                elapsed=elapsed))
            if interrupt.set:
                raise TrainingInterrupted(done, save(done, time.perf_counter() - t_start))
    train_time = time.perf_counter() - t_loop
    tr, va = evaluate(cfg.final_eval_iters)
    elapsed = time.perf_counter() - t_start
    history.append({"step": cfg.max_iters, "train_loss": tr, "val_loss": va,
                    "lr": lr_at(cfg.max_iters - 1, cfg), "elapsed": elapsed})
    metrics_log.write(kind="eval", **history[-1])
    emit(TrainEvent("eval", cfg.max_iters, cfg.max_iters, train_loss=tr, val_loss=va,
                    elapsed=elapsed))
    mean_tps = trained_steps * B * T / train_time if trained_steps else 0.0
    ckpt = save(cfg.max_iters, elapsed, tr, va)
    model.eval()
    return TrainResult(model=model, tokenizer=tokenizer, model_config=model_config,
                       train_config=cfg, history=history, train_loss=tr, val_loss=va,
                       elapsed=elapsed, tokens_per_s=mean_tps, checkpoint=ckpt,
                       attention=attention)


@torch.no_grad()
def evaluate_split(model: LanguageModel, ids: torch.Tensor, *, batch_size: int = 32,
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


def sample_text(model: LanguageModel, tokenizer: Tokenizer, prompt: str = "",
                max_new_tokens: int = 300, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, seed: int | None = None, stop: str | None = None,
                use_cache: bool = True, on_text: Callable[[str], None] | None = None) -> str:
    """Generate a continuation of ``prompt``; returns prompt + generated text.

    ``stop``: end as soon as the generated text contains this string (it is kept in the
    output). ``on_text`` receives each newly generated piece of text (for streaming).
    """
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) if prompt else [0]  # no prompt: start from token 0
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    pieces: list[str] = []
    tail = max(len(stop), 1) * 2 if stop else 0

    def on_token(nxt):
        piece = tokenizer.decode(nxt[0].tolist())
        pieces.append(piece)
        if on_text:
            on_text(piece)
        if stop and stop in "".join(pieces[-tail:]):
            return False
        return True

    model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   generator=gen, use_cache=use_cache, on_token=on_token)
    return (prompt if prompt else "") + "".join(pieces)
