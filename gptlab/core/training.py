"""Training: data split and batching, the optimisation loop, evaluation and the final sample.

The loop is nanoGPT's: random windows of ``block_size + 1`` tokens, AdamW (weight decay on
matrices only), linear warmup then cosine decay of the learning rate (Loshchilov & Hutter 2017),
gradient clipping. Train and val losses are estimated every ``eval_interval`` steps on a fixed
set of batches, so the curve is not noisier than the model. Progress is reported through an
``on_event`` callback; the CLI turns it into a progress bar (library code never prints).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import torch

from gptlab.core.build import build_model, resolve_device
from gptlab.core.checkpoint import FILENAME, save_checkpoint
from gptlab.core.config import ModelConfig, TrainConfig
from gptlab.core.errors import DataError
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


def train(reg: Registry, model_config: ModelConfig, train_config: TrainConfig, text: str, *,
          out_dir: str | Path | None = None,
          on_event: Callable[[TrainEvent], None] | None = None) -> TrainResult:
    """Fit a tokenizer on ``text``, build the model, train it, evaluate, and save a checkpoint.

    The final losses are estimated on ``final_eval_iters`` fixed batches of each split.
    """
    cfg = train_config
    emit = on_event or (lambda event: None)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    tokenizer = reg.tokenizer(cfg.tokenizer)()
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

    def evaluate(step, iters):
        kw = dict(iters=iters, batch_size=B, block_size=T, device=device, seed=cfg.seed + 1)
        return (estimate_loss(model, splits.train, **kw), estimate_loss(model, splits.val, **kw))

    history: list[dict] = []
    model.train()
    t_start = time.perf_counter()
    t_window, tokens_window = t_start, 0
    tokens_per_s = 0.0
    for step in range(cfg.max_iters):
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

        tokens_window += B * T
        now = time.perf_counter()
        if now - t_window > 0.5:
            tokens_per_s = tokens_window / (now - t_window)
            t_window, tokens_window = now, 0
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise DataError(f"training diverged at step {step} (loss {loss_value}); lower "
                            f"--lr or enable --grad-clip")
        emit(TrainEvent("step", step + 1, cfg.max_iters, loss=loss_value, lr=lr,
                        tokens_per_s=tokens_per_s, elapsed=now - t_start))
        last = step + 1 == cfg.max_iters
        if (step + 1) % cfg.eval_interval == 0 and not last:
            tr, va = evaluate(step + 1, cfg.eval_iters)
            history.append({"step": step + 1, "train_loss": tr, "val_loss": va, "lr": lr,
                            "elapsed": time.perf_counter() - t_start})
            emit(TrainEvent("eval", step + 1, cfg.max_iters, train_loss=tr, val_loss=va,
                            elapsed=time.perf_counter() - t_start))
    train_time = time.perf_counter() - t_start
    tr, va = evaluate(cfg.max_iters, cfg.final_eval_iters)
    elapsed = time.perf_counter() - t_start
    history.append({"step": cfg.max_iters, "train_loss": tr, "val_loss": va,
                    "lr": lr_at(cfg.max_iters - 1, cfg), "elapsed": elapsed})
    emit(TrainEvent("eval", cfg.max_iters, cfg.max_iters, train_loss=tr, val_loss=va,
                    elapsed=elapsed))
    mean_tps = cfg.max_iters * B * T / train_time
    ckpt = None
    if out_dir is not None:
        ckpt = save_checkpoint(
            Path(out_dir) / FILENAME, model=model, model_config=model_config, train_config=cfg,
            tokenizer=tokenizer,
            metrics={"train_loss": tr, "val_loss": va, "elapsed": elapsed,
                     "tokens_per_s": mean_tps, "attention": attention, "history": history})
    model.eval()
    return TrainResult(model=model, tokenizer=tokenizer, model_config=model_config,
                       train_config=cfg, history=history, train_loss=tr, val_loss=va,
                       elapsed=elapsed, tokens_per_s=mean_tps, checkpoint=ckpt,
                       attention=attention)


def sample_text(model: LanguageModel, tokenizer: Tokenizer, prompt: str = "",
                max_new_tokens: int = 300, *, temperature: float = 1.0, top_k: int | None = None,
                seed: int | None = None) -> str:
    """Generate a continuation of ``prompt`` and return it (prompt included) as text."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) if prompt else [0]  # no prompt: start from token 0
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return tokenizer.decode(out[0, 0 if prompt else 1:].tolist())
