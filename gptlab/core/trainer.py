"""Training: the :class:`Trainer` and its schedule, optimiser and events.

The loop is nanoGPT's: random windows of ``block_size + 1`` tokens, AdamW (Loshchilov & Hutter
2019; weight decay on matrices only), linear warmup then cosine decay of the learning rate
(Loshchilov & Hutter 2017), gradient clipping. Train and val losses are estimated every
``eval_interval`` steps on a fixed set of batches. Progress is reported through an ``on_event``
callback (:class:`TrainEvent`); the CLI turns it into a progress bar (library code never prints).

The :class:`Trainer` is small methods over one explicit state (:class:`TrainState`, defined with
the checkpoint format): ``__init__`` builds (or restores) the tokenizer, data, model and
optimiser; :meth:`Trainer.step` is one optimiser step (:meth:`Trainer.forward_backward` is the
place to wrap for autocast, accumulation or DDP); :meth:`Trainer.evaluate`, :meth:`Trainer.save`
and :meth:`Trainer.fit` (the whole run) use them.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import torch

from gptlab.core.build import RunPlan, build_model, plan_run
from gptlab.core.checkpoint import Checkpoint, TrainState, save_checkpoint
from gptlab.core.config import ModelConfig, TrainConfig
from gptlab.core.errors import CheckpointError, DataError, GptlabError
from gptlab.core.evaluation import estimate_loss
from gptlab.core.interfaces import LanguageModel, Tokenizer
from gptlab.core.plugins import Registry
from gptlab.core.runs import BEST, CHECKPOINT, MetricsLog
from gptlab.data.batches import encode_splits, get_batch

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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``learning_rate``, then cosine decay to ``min_lr_ratio * learning_rate``."""
    lr, min_lr = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if step < cfg.warmup_iters:
        return lr * (step + 1) / cfg.warmup_iters
    span = max(1, cfg.max_iters - cfg.warmup_iters)
    progress = min(1.0, (step - cfg.warmup_iters) / span)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (embeddings, Linear weights) only, as nanoGPT."""
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


class Trainer:
    """Fit a tokenizer on ``text``, build the model, train it, evaluate it, save checkpoints.

    With ``out_dir``: ``ckpt.pt`` (latest, resumable) and ``best.pt`` (lowest val loss) are
    written at every evaluation and at the end, and ``metrics.jsonl`` logs the run. ``resume``
    is a :class:`~gptlab.core.checkpoint.Checkpoint` to continue bit-exactly: model, optimizer,
    step, RNG states and data position are restored. ``plan`` is the pre-flight's
    :class:`~gptlab.core.build.RunPlan` (made here if not given).
    """

    def __init__(self, reg: Registry, model_config: ModelConfig, train_config: TrainConfig,
                 text: str, *, out_dir: str | Path | None = None,
                 on_event: Callable[[TrainEvent], None] | None = None,
                 resume: Checkpoint | None = None, data_source: str | None = None,
                 log_interval: int = 10, plan: RunPlan | None = None):
        self.cfg = cfg = train_config
        self.emit = on_event or (lambda event: None)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.log_interval = log_interval
        self.plan = plan or plan_run(reg, model_config, train_config)
        self.device = self.plan.device
        torch.manual_seed(cfg.seed)
        self._build(reg, model_config, text, resume, data_source)
        if resume is not None:
            self._restore(resume, data_source)
        self.metrics_log = MetricsLog(self.out_dir,
                                      self.state.step if resume is not None else None)

    # ---- build / restore ---------------------------------------------------------------
    def _build(self, reg, model_config, text, resume, data_source):
        cfg = self.cfg
        if resume is not None:
            self.tokenizer = self.plan.tokenizer_cls.from_state(resume.tokenizer_state)
        else:
            self.tokenizer = self.plan.tokenizer_cls()
            self.tokenizer.train(text)
        self.model_config = attrs.evolve(model_config, vocab_size=self.tokenizer.vocab_size)
        self.splits = encode_splits(text, self.tokenizer, cfg.val_fraction,
                                    self.model_config.block_size)
        self.model = build_model(reg, self.model_config, self.device,
                                 attention=self.plan.attention)
        log.info("model %s: %.2fM parameters, attention %s", self.model_config.model,
                 self.model.num_parameters() / 1e6, self.plan.attention_name)
        self.optimizer = make_optimizer(self.model, cfg)
        self.batch_gen = torch.Generator().manual_seed(cfg.seed)
        self.state = TrainState(data_source=data_source)

    def _restore(self, ckpt: Checkpoint, data_source: str | None):
        st = ckpt.train_state
        if st is None or ckpt.optimizer is None:
            raise CheckpointError("this checkpoint has no training state to resume from")
        self.model.load_state_dict(ckpt.model)
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.batch_gen.set_state(st.batch_rng)
        torch.set_rng_state(st.torch_rng)
        self.state = attrs.evolve(st, history=list(st.history),
                                  data_source=data_source or st.data_source)

    # ---- one step ----------------------------------------------------------------------
    def lr(self, step: int) -> float:
        return lr_at(step, self.cfg)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        T, B = self.model_config.block_size, self.cfg.batch_size
        x, y = get_batch(self.splits.train, B, T, self.batch_gen)
        return x.to(self.device), y.to(self.device)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss of one batch, with its gradients accumulated into the parameters."""
        _, loss = self.model(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def step(self) -> float:
        """One optimiser step at ``state.step``; returns the batch's training loss."""
        lr = self.lr(self.state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.forward_backward(*self.next_batch())
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.state.step += 1
        value = loss.item()
        if not math.isfinite(value):
            raise DataError(f"training diverged at step {self.state.step - 1} (loss {value}); "
                            f"lower --lr")
        return value

    # ---- evaluation and checkpoints ----------------------------------------------------
    def evaluate(self, iters: int) -> tuple[float, float]:
        """(train, val) loss estimates on ``iters`` fixed batches of each split."""
        kw = dict(iters=iters, batch_size=self.cfg.batch_size,
                  block_size=self.model_config.block_size, device=self.device,
                  seed=self.cfg.seed + 1)
        return (estimate_loss(self.model, self.splits.train, **kw),
                estimate_loss(self.model, self.splits.val, **kw))

    def checkpoint(self, train_loss: float | None = None,
                   val_loss: float | None = None) -> Checkpoint:
        """The run's current state as a :class:`~gptlab.core.checkpoint.Checkpoint`."""
        st = self.state
        state = attrs.evolve(st, batch_rng=self.batch_gen.get_state(),
                             torch_rng=torch.get_rng_state())
        metrics = {"step": st.step, "train_loss": train_loss, "val_loss": val_loss,
                   "elapsed": st.elapsed, "attention": self.plan.attention_name}
        return Checkpoint(model_config=self.model_config, train_config=self.cfg,
                          tokenizer_name=self.tokenizer.name,
                          tokenizer_state=self.tokenizer.state_dict(),
                          model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                          train_state=state, metrics=metrics)

    def save(self, train_loss: float | None = None, val_loss: float | None = None
             ) -> Path | None:
        """Write ``ckpt.pt``, and ``best.pt`` when ``val_loss`` improves; None without out_dir."""
        if self.out_dir is None:
            return None
        improved = val_loss is not None and val_loss < self.state.best_val
        if improved:
            self.state.best_val = val_loss
        ckpt = self.checkpoint(train_loss, val_loss)
        path = save_checkpoint(self.out_dir / CHECKPOINT, ckpt)
        if improved:
            save_checkpoint(self.out_dir / BEST, ckpt)
        return path

    # ---- the whole run -----------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to ``max_iters`` (from wherever the state is), evaluate, save; Ctrl-C saves
        ``ckpt.pt`` after the current step and raises :class:`TrainingInterrupted`. The final
        losses are estimated on ``final_eval_iters`` fixed batches of each split."""
        cfg, st = self.cfg, self.state
        B, T = cfg.batch_size, self.model_config.block_size
        self.model.train()
        t_start = time.perf_counter() - st.elapsed
        t_window, tokens_window, tokens_per_s = time.perf_counter(), 0, 0.0
        trained_steps, t_loop = 0, time.perf_counter()
        with _SigintFlag() as interrupt:
            while st.step < cfg.max_iters:
                lr = self.lr(st.step)
                loss = self.step()
                trained_steps += 1
                done = st.step
                tokens_window += B * T
                now = time.perf_counter()
                if now - t_window > 0.5:
                    tokens_per_s = tokens_window / (now - t_window)
                    t_window, tokens_window = now, 0
                st.elapsed = now - t_start
                self.emit(TrainEvent("step", done, cfg.max_iters, loss=loss, lr=lr,
                                     tokens_per_s=tokens_per_s, elapsed=st.elapsed))
                if done % self.log_interval == 0:
                    self.metrics_log.write(kind="step", step=done, train_loss=loss, lr=lr,
                                           tokens_per_s=tokens_per_s, elapsed=st.elapsed)
                if done % cfg.eval_interval == 0 and done != cfg.max_iters:
                    self._eval_and_save(cfg.eval_iters, lr, t_start)
                if interrupt.set:
                    st.elapsed = time.perf_counter() - t_start
                    raise TrainingInterrupted(done, self.save())
        train_time = time.perf_counter() - t_loop
        tr, va, path = self._eval_and_save(cfg.final_eval_iters, self.lr(cfg.max_iters - 1),
                                           t_start)
        mean_tps = trained_steps * B * T / train_time if trained_steps else 0.0
        self.model.eval()
        return TrainResult(model=self.model, tokenizer=self.tokenizer,
                           model_config=self.model_config, train_config=cfg,
                           history=st.history, train_loss=tr, val_loss=va, elapsed=st.elapsed,
                           tokens_per_s=mean_tps, checkpoint=path,
                           attention=self.plan.attention_name)

    def _eval_and_save(self, iters: int, lr: float, t_start: float
                       ) -> tuple[float, float, Path | None]:
        st = self.state
        tr, va = self.evaluate(iters)
        st.elapsed = time.perf_counter() - t_start
        st.history.append({"step": st.step, "train_loss": tr, "val_loss": va, "lr": lr,
                           "elapsed": st.elapsed})
        self.metrics_log.write(kind="eval", **st.history[-1])
        path = self.save(tr, va)
        self.emit(TrainEvent("eval", st.step, self.cfg.max_iters, train_loss=tr, val_loss=va,
                             elapsed=st.elapsed))
        return tr, va, path


def train(reg: Registry, model_config: ModelConfig, train_config: TrainConfig, text: str,
          **kwargs) -> TrainResult:
    """``Trainer(reg, model_config, train_config, text, **kwargs).fit()``."""
    return Trainer(reg, model_config, train_config, text, **kwargs).fit()
