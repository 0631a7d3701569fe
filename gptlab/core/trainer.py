"""Training: the :class:`Trainer` and its schedule, optimiser and events.

The loop is nanoGPT's: random windows of ``block_size + 1`` tokens, AdamW (Loshchilov & Hutter
2019; weight decay on matrices only), linear warmup then cosine decay of the learning rate
(Loshchilov & Hutter 2017), gradient clipping. Train and val losses are estimated every
``eval_interval`` steps on a fixed set of batches. Progress is reported through an ``on_event``
callback (:class:`TrainEvent`); the CLI turns it into a progress bar (library code never prints).

The :class:`Trainer` is small methods over one explicit state (:class:`TrainState`, defined with
the checkpoint format): ``__init__`` builds (or restores) the tokenizer, data, model and
optimiser; :meth:`Trainer.step` is one optimiser step over ``grad_accum`` micro-batches
(:meth:`Trainer.forward_backward`: ``torch.autocast`` for ``dtype``, a ``GradScaler`` for
float16, ``no_sync`` on all but the last micro-batch under DDP); :meth:`Trainer.evaluate`,
:meth:`Trainer.save` and :meth:`Trainer.fit` (the whole run) use them. Started by torchrun
(:mod:`gptlab.core.distributed`), every process runs the same Trainer on its own micro-batches
under ``DistributedDataParallel``; rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import attrs
import torch

from gptlab.core import distributed, malloc, precision
from gptlab.core.planning import RunPlan, build_model, plan_run, resumed_choices
from gptlab.core.checkpoint import (Checkpoint, TrainState, check_weights,
                                    non_finite_parameters, restore_tokenizer, save_checkpoint)
from gptlab.core.config import ModelConfig, TrainConfig
from gptlab.core.errors import (CheckpointError, ConfigError, GptlabError, OutOfMemory,
                                TrainingDiverged, command, first_line)
from gptlab.core.evaluation import EvaluationStopped, estimate_loss
from gptlab.core.interfaces import LanguageModel, Tokenizer
from gptlab.core.memory import check_fits
from gptlab.core.plugins import Registry
from gptlab.core.runs import BEST, CHECKPOINT, MetricsLog, RunFolder
from gptlab.data.batches import draw_starts, encode_splits, windows
from gptlab.data.corpora import check_same_text, text_sha256

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
    train_time: float = 0.0  # of elapsed, in optimiser steps (what --time-budget counts)


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
    matmul: str | None = None


def lr_at(step: int, cfg: TrainConfig, train_time: float = 0.0) -> float:
    """Linear warmup to ``learning_rate`` over ``warmup_iters`` steps, then a decay to
    ``min_lr_ratio * learning_rate`` by ``max_iters`` or, with a ``time_budget``, by the time
    the budget is spent (``train_time`` seconds of steps so far): a run on a slower machine
    takes fewer steps but still ends its schedule (and its training) on time. The decay is
    ``cfg.schedule``: ``cosine`` (Loshchilov & Hutter 2017) over everything after warmup, or
    ``wsd`` (warmup-stable-decay, Hu et al. 2024): the peak held, then a linear decay over the
    last ``warmdown`` fraction of the run."""
    lr, min_lr = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if step < cfg.warmup_iters:
        return lr * (step + 1) / cfg.warmup_iters
    if cfg.time_budget > 0:
        progress = min(1.0, train_time / cfg.time_budget)
    else:
        span = max(1, cfg.max_iters - cfg.warmup_iters)
        progress = min(1.0, (step - cfg.warmup_iters) / span)
    if cfg.schedule == "wsd":
        left = 1.0 - progress  # fraction of the run still to go
        return lr if left >= cfg.warmdown else min_lr + left / cfg.warmdown * (lr - min_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (embeddings, Linear weights) only, as nanoGPT (the
    ``adamw`` recipe; runs choose theirs with ``--optimizer``)."""
    from gptlab.core.optimizers import AdamWRecipe

    return AdamWRecipe.build(model, cfg)


class TrainingInterrupted(GptlabError):
    """Ctrl-C or SIGTERM during training: the state was checkpointed first (``checkpoint``,
    ``step``). ``exit_code`` is the shell's convention for the signal (130, 143)."""

    def __init__(self, step: int, checkpoint: Path | None, *, signum: int = signal.SIGINT,
                 during: str | None = None):
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        when = f"during {during} " if during else ""
        where = (f"checkpoint saved to {checkpoint}; continue with "
                 f"`{command('run', '--resume', checkpoint.parent)}`" if checkpoint
                 else "nothing saved (no --out-dir)")
        super().__init__(f"{what} {when}after step {step}; {where}")
        self.step, self.checkpoint, self.exit_code = step, checkpoint, 128 + int(signum)


class _StopFlag:
    """While active, the first Ctrl-C (SIGINT) or SIGTERM only sets a flag, checked between
    steps and between evaluation batches, so the saved state is consistent; a second one acts at
    once (as if gptlab had not caught the first)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self._old = None, {}

    @property
    def set(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        for s, old in self._old.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


class Trainer:
    """Fit a tokenizer on ``text``, build the model, train it, evaluate it, save checkpoints.

    With ``out_dir``: ``ckpt.pt`` (latest, resumable) and ``best.pt`` (lowest val loss) are
    written at every evaluation and at the end, and ``metrics.jsonl`` logs the run; the folder
    is held (:class:`~gptlab.core.runs.RunFolder`) from construction to the end of :meth:`fit`
    (or :meth:`close`): a folder holding another run is refused unless ``overwrite`` (pass a
    :class:`~gptlab.core.runs.RunFolder` to hold it earlier, as ``gpt run`` does). ``resume``
    is a :class:`~gptlab.core.checkpoint.Checkpoint` to continue bit-exactly: model, optimizer,
    step, RNG states and data position are restored (the text must be the one it was trained
    on). ``plan`` is the pre-flight's :class:`~gptlab.core.planning.RunPlan` (made here if not
    given). Nothing non-finite is ever saved: a NaN or inf loss or weight raises
    :class:`~gptlab.core.errors.TrainingDiverged` first.
    """

    def __init__(self, reg: Registry, model_config: ModelConfig, train_config: TrainConfig,
                 text: str, *, out_dir: str | Path | RunFolder | None = None,
                 on_event: Callable[[TrainEvent], None] | None = None,
                 resume: Checkpoint | None = None, data_source: str | None = None,
                 log_interval: int = 10, plan: RunPlan | None = None, overwrite: bool = False):
        self.emit = on_event or (lambda event: None)
        self.log_interval = log_interval
        self.plan = plan or plan_run(
            reg, model_config, train_config, new_run=resume is None,
            **resumed_choices(resume.metrics if resume else None))
        if not self.plan.made_for(model_config, train_config):
            raise ConfigError("the RunPlan was made for other configs; make it with "
                              "plan_run(reg, model_config, train_config)")
        self.cfg = self.plan.train_config  # as it trains: --dtype auto resolved
        self.world = distributed.current()
        self.device = distributed.device_for(self.plan.device, self.world)
        if self.device.type == "cpu":  # each step's activations in the last step's memory
            malloc.keep_freed_memory()
        self.notes: list[str] = list(self.plan.notes)  # what the run adapted, for the caller
        self.folder = None
        if self.world.is_main:  # only rank 0 writes files
            if isinstance(out_dir, RunFolder):
                self.folder = out_dir
            elif out_dir is not None:
                here = (resume is not None and resume.path is not None
                        and resume.path.parent.resolve() == Path(out_dir).resolve())
                self.folder = RunFolder(out_dir, resume=here, overwrite=overwrite)
        self.out_dir = None if self.folder is None else self.folder.path
        try:
            torch.manual_seed(self.cfg.seed)
            self._build(reg, model_config, text, data_source, resume)
            if resume is not None:
                self._restore(resume, data_source)
            self._saved_step = self.state.step if resume is not None else None
            if self.folder is not None:  # every check passed: a run replaced is moved aside
                self.folder.begin()
            self.metrics_log = MetricsLog(self.out_dir,
                                          self.state.step if resume is not None else None)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run folder and, under DDP, the wrapper (done by :meth:`fit` when it returns
        or raises). The wrapper's reducer holds the process group: released here, the group is
        freed by :func:`~gptlab.core.distributed.shutdown` while Python runs, not at exit, where
        gloo's threads stopping can abort the process."""
        if self.folder is not None:
            self.folder.close()
        if getattr(self, "train_model", None) is not getattr(self, "eval_model", None):
            self.train_model = None  # a later fit() wraps the model again

    @property
    def micro_batches(self) -> int:
        """Micro-batches of ``batch_size`` per optimiser step, over every rank."""
        return self.cfg.grad_accum * self.world.size

    # ---- build / restore ---------------------------------------------------------------
    def _build(self, reg, model_config, text, data_source, resume):
        cfg = self.cfg
        sha = text_sha256(text)
        st = None if resume is None else resume.train_state
        if st is not None:
            check_same_text(text, st.data_sha256, st.data_source, name=data_source or "this text",
                            fix="resume with that text, or start a new run")
        if st is not None:
            self._adapt_accumulation(len(st.batch_rngs))
            cfg = self.cfg
        if resume is not None:
            self.tokenizer = restore_tokenizer(reg, resume)
        else:
            self.tokenizer = self.plan.tokenizer_cls()
            self.tokenizer.train(text)
        self.model_config = attrs.evolve(model_config, vocab_size=self.tokenizer.vocab_size)
        self.splits = encode_splits(text, self.tokenizer, cfg.val_fraction,
                                    self.model_config.block_size)
        self._check_memory(reg)
        with _out_of_memory("building the model"):
            self.model = build_model(reg, self.model_config, self.device,
                                     components=self.plan.components)
            self.optimizer = reg.get("optimizers", cfg.optimizer).build(self.model, cfg)
        log.info("model %s: %.2fM parameters, attention %s, layer kernels %s, matmul %s",
                 self.model_config.model, self.model.num_parameters() / 1e6,
                 self.plan.attention_name, self.plan.kernels_name, self.plan.matmul_name)
        if self.world.rank:  # the same init everywhere (DDP checks), then its own dropout
            torch.manual_seed(stream_seed(cfg.seed, self.world.rank))
        # one sampler per micro-batch slot (rank r, micro-batch k -> stream r * K + k); every
        # rank draws every stream, so rank 0 holds (and saves) the whole data position
        self.batch_gens = [torch.Generator().manual_seed(stream_seed(cfg.seed, s))
                           for s in range(self.micro_batches)]
        self.state = TrainState(data_source=data_source, data_sha256=sha)
        self.autocast = precision.autocast(self.device, cfg.dtype)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=cfg.dtype == "float16")
        core = self.model
        if cfg.compile:  # $GPTLAB_COMPILE_BACKEND: another torch.compile backend (tests: aot_eager)
            core = torch.compile(self.model,
                                 backend=os.environ.get("GPTLAB_COMPILE_BACKEND", "inductor"))
        self.eval_model = core
        self.train_model = self._replica(core)

    def _replica(self, core: torch.nn.Module) -> torch.nn.Module:
        """What trains: ``core`` itself, or under torchrun ``core`` in DistributedDataParallel
        (built on every rank together: rank 0's weights are broadcast)."""
        if not self.world.active:
            return core
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(core, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _adapt_accumulation(self, streams: int) -> None:
        """A checkpoint of W x K micro-batches per step continues on this world size with the
        same micro-batches: K' = W * K / world size (a 2-process run resumes in one process with
        twice the accumulation)."""
        if streams == self.micro_batches:
            return
        if streams % self.world.size:
            raise ConfigError(f"this run was trained with {streams} micro-batches per step "
                              f"(processes x --grad-accum); resume it on a number of processes "
                              f"that divides {streams}")
        k = streams // self.world.size
        self.notes.append(f"--grad-accum {k} (was {self.cfg.grad_accum}): {streams} "
                          f"micro-batches per step, as the run was trained")
        self.cfg = attrs.evolve(self.cfg, grad_accum=k)

    def _check_memory(self, reg) -> None:
        """A one-line error before allocating a run that cannot fit (see gptlab.core.memory)."""
        mc, plan = self.model_config, self.plan
        check_fits(lambda: plan.model_cls(mc, plan.components), mc, self.cfg, self.device)

    def _restore(self, ckpt: Checkpoint, data_source: str | None):
        st = ckpt.train_state
        if st is None or ckpt.optimizer is None:
            raise CheckpointError(f"checkpoint {ckpt.where} has no training state to resume "
                                  f"from (exported weights?); sample or evaluate it instead")
        check_weights(self.model, ckpt)
        fresh = [dict(g) for g in self.optimizer.param_groups]
        try:  # torch's and the recipe's own checks, on the checkpoint's data
            with warnings.catch_warnings():  # torch's about an odd state: it is refused below
                warnings.simplefilter("ignore")
                self.model.load_state_dict(ckpt.model)
                self.optimizer.load_state_dict(ckpt.optimizer)
            for gen, state in zip(self.batch_gens, st.batch_rngs):
                gen.set_state(state)
            if st.scaler and self.scaler.is_enabled():
                self.scaler.load_state_dict(st.scaler)
            problem = _optimizer_state_problem(self.optimizer, fresh)
        except Exception as e:
            problem = first_line(f"{type(e).__name__}: {e}", 100)
        if problem:
            raise CheckpointError(f"checkpoint {ckpt.where} holds an optimizer or generator state "
                                  f"this run cannot continue from ({problem}); it is damaged or "
                                  f"was not written by gptlab")
        if self.world.rank:
            torch.manual_seed(stream_seed(self.cfg.seed, self.world.rank, st.step))
        else:
            torch.set_rng_state(st.torch_rng)
        self.state = attrs.evolve(st, history=list(st.history), batch_rngs=[], torch_rng=None,
                                  scaler=None, data_source=data_source or st.data_source)

    # ---- one step ----------------------------------------------------------------------
    def lr(self, step: int) -> float:
        return lr_at(step, self.cfg, self.state.train_time)

    def _budget_left(self) -> bool:
        return self.cfg.time_budget <= 0 or self.state.train_time < self.cfg.time_budget

    def next_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's ``grad_accum`` micro-batches of the next step (every stream advances)."""
        T, B, K = self.model_config.block_size, self.cfg.batch_size, self.cfg.grad_accum
        data, mine = self.splits.train, range(self.world.rank * K, (self.world.rank + 1) * K)
        batches = []
        for s, gen in enumerate(self.batch_gens):
            starts = draw_starts(data, B, T, gen)
            if s in mine:
                x, y = windows(data, starts, T)
                batches.append((x.to(self.device), y.to(self.device)))
        return batches

    def forward_backward(self, batches: list[tuple[torch.Tensor, torch.Tensor]]
                         ) -> torch.Tensor:
        """Mean loss of this rank's micro-batches; their gradients, averaged over every
        micro-batch of every rank, are left in the parameters (DDP all-reduces once, after the
        last micro-batch; the others run under ``no_sync``)."""
        self.optimizer.zero_grad(set_to_none=True)
        k = len(batches)
        total = None
        for i, (x, y) in enumerate(batches):
            defer = self.world.active and i < k - 1
            with self.train_model.no_sync() if defer else contextlib.nullcontext():
                with self.autocast:
                    _, loss = self.train_model(x, y)
                self.scaler.scale(loss if k == 1 else loss / k).backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total if k == 1 else total / k

    def step(self) -> float:
        """One optimiser step at ``state.step``; returns the training loss of its micro-batches
        (averaged over the ranks)."""
        lr = self.lr(self.state.step)
        for group in self.optimizer.param_groups:  # a group's own base_lr follows the schedule
            group["lr"] = lr if "base_lr" not in group else \
                group["base_lr"] * lr / self.cfg.learning_rate
        with _out_of_memory(f"training step {self.state.step + 1}"), self._collective():
            loss = self.forward_backward(self.next_batches())
            if self.cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.state.step += 1
        value = loss.item()
        if self.world.active:
            (value,) = distributed.all_mean([value], self.world, self.device)
        if not math.isfinite(value):
            raise self._diverged(f"the training loss is {value}")
        return value

    def _collective(self):
        """Collectives inside (DDP's all-reduce in backward) name a failed peer in one line."""
        return _peer_failure() if self.world.active else contextlib.nullcontext()

    def _diverged(self, what: str) -> TrainingDiverged:
        lr = self.lr(max(0, self.state.step - 1))
        if self.out_dir is not None and self._saved_step is not None:
            lower = command("run", "--resume", self.out_dir, "--lr",
                            f"{self.cfg.learning_rate / 10:g}")
            fix = (f"{self.out_dir / CHECKPOINT} holds step {self._saved_step}: continue it with "
                   f"a lower learning rate, e.g. `{lower}`")
        else:
            fix = f"train again with a lower --lr (this run used {self.cfg.learning_rate:g})"
        return TrainingDiverged(f"training diverged at step {self.state.step} (lr {lr:.3g}): "
                                f"{what}; nothing non-finite was saved; {fix}")

    # ---- evaluation and checkpoints ----------------------------------------------------
    def evaluate(self, iters: int, *, should_stop: Callable[[], bool] | None = None
                 ) -> tuple[float, float]:
        """(train, val) loss estimates on ``iters`` fixed batches of each split (the batches
        shared out among the ranks, the result the same on every rank)."""
        kw = dict(iters=iters, batch_size=self.cfg.batch_size,
                  block_size=self.model_config.block_size, device=self.device,
                  seed=self.cfg.seed + 1, should_stop=should_stop, autocast=self.autocast,
                  part=(self.world.rank, self.world.size))
        sums = [estimate_loss(self.eval_model, self.splits.train, **kw),
                estimate_loss(self.eval_model, self.splits.val, **kw)]
        if self.world.active:  # each rank's share of the mean, summed over the ranks
            with self._collective():
                sums = [v * self.world.size for v in
                        distributed.all_mean(sums, self.world, self.device)]
        return sums[0], sums[1]

    def checkpoint(self, train_loss: float | None = None,
                   val_loss: float | None = None) -> Checkpoint:
        """The run's current state as a :class:`~gptlab.core.checkpoint.Checkpoint`."""
        st = self.state
        state = attrs.evolve(st, batch_rngs=[g.get_state() for g in self.batch_gens],
                             torch_rng=torch.get_rng_state(),
                             scaler=self.scaler.state_dict() if self.scaler.is_enabled()
                             else None)
        metrics = {"step": st.step, "train_loss": train_loss, "val_loss": val_loss,
                   "elapsed": st.elapsed, "attention": self.plan.attention_name,
                   "kernels": self.plan.kernels_name, "matmul": self.plan.matmul_name}
        return Checkpoint(model_config=self.model_config, train_config=self.cfg,
                          tokenizer_name=self.tokenizer.name,
                          tokenizer_state=self.tokenizer.state_dict(),
                          model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                          train_state=state, metrics=metrics)

    def save(self, train_loss: float | None = None, val_loss: float | None = None
             ) -> Path | None:
        """Write ``ckpt.pt``, and ``best.pt`` when ``val_loss`` improves; None without out_dir.

        Refuses (TrainingDiverged) to write non-finite losses or weights."""
        bad = non_finite_parameters(self.model)  # on every rank: they stop together
        if bad:
            raise self._diverged(f"the weights hold NaN or inf ({bad[0]})")
        if self.out_dir is None:
            return None
        improved = val_loss is not None and val_loss < self.state.best_val
        if improved:
            self.state.best_val = val_loss
        ckpt = self.checkpoint(train_loss, val_loss)
        path = save_checkpoint(self.out_dir / CHECKPOINT, ckpt)
        self.folder.commit()  # the run it replaced (--overwrite), if any, is deleted now
        self._saved_step = self.state.step
        if improved:
            save_checkpoint(self.out_dir / BEST, ckpt)
        return path

    # ---- the whole run -----------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to ``max_iters`` (from wherever the state is), evaluate, save; the run folder is
        released at the end. Ctrl-C or SIGTERM (at any point: a step or an evaluation) saves
        ``ckpt.pt`` first and raises :class:`TrainingInterrupted`. The final losses are
        estimated on ``final_eval_iters`` fixed batches of each split."""
        if self.train_model is None:  # closed by an earlier fit()
            self.train_model = self._replica(self.eval_model)
        try:
            with _StopFlag() as stop:
                return self._fit(stop)
        finally:
            self.close()

    def _fit(self, stop: _StopFlag) -> TrainResult:
        cfg, st = self.cfg, self.state
        B, T = cfg.batch_size, self.model_config.block_size
        self.model.train()
        t_start = time.perf_counter() - st.elapsed
        t_window, tokens_window, tokens_per_s = time.perf_counter(), 0, 0.0
        trained_steps, t_loop = 0, time.perf_counter()
        while st.step < cfg.max_iters and self._budget_left():
            lr = self.lr(st.step)
            t_step = time.perf_counter()
            loss = self.step()
            step_time = time.perf_counter() - t_step
            if cfg.time_budget > 0 and self.world.active:  # one clock for the schedule and stop
                (step_time,) = distributed.all_mean([step_time], self.world, self.device)
            st.train_time += step_time
            trained_steps += 1
            done = st.step
            tokens_window += B * T * self.micro_batches
            now = time.perf_counter()
            if now - t_window > 0.5:
                tokens_per_s = tokens_window / (now - t_window)
                t_window, tokens_window = now, 0
            st.elapsed = now - t_start
            self.emit(TrainEvent("step", done, cfg.max_iters, loss=loss, lr=lr,
                                 tokens_per_s=tokens_per_s, elapsed=st.elapsed,
                                 train_time=st.train_time))
            if done % self.log_interval == 0:
                self.metrics_log.write(kind="step", step=done, train_loss=loss, lr=lr,
                                       tokens_per_s=tokens_per_s, elapsed=st.elapsed)
            if done % cfg.eval_interval == 0 and done != cfg.max_iters and self._budget_left():
                self._eval_and_save(cfg.eval_iters, lr, t_start, stop, "an evaluation")
            signum = distributed.agreed_signal(stop.signum, self.world, self.device)  # together
            if signum:
                stop.signum = signum
                self._interrupted(stop, t_start)
        train_time = time.perf_counter() - t_loop
        tr, va, path = self._eval_and_save(cfg.final_eval_iters, self.lr(max(0, st.step - 1)),
                                           t_start, stop, "the final evaluation")
        mean_tps = (trained_steps * B * T * self.micro_batches / train_time if trained_steps
                    else 0.0)
        self.model.eval()
        return TrainResult(model=self.model, tokenizer=self.tokenizer,
                           model_config=self.model_config, train_config=cfg,
                           history=st.history, train_loss=tr, val_loss=va, elapsed=st.elapsed,
                           tokens_per_s=mean_tps, checkpoint=path,
                           attention=self.plan.attention_name, matmul=self.plan.matmul_name)

    def _interrupted(self, stop: _StopFlag, t_start: float, during: str | None = None):
        self.state.elapsed = time.perf_counter() - t_start
        raise TrainingInterrupted(self.state.step, self.save(),
                                  signum=stop.signum or signal.SIGINT, during=during)

    def _eval_and_save(self, iters: int, lr: float, t_start: float, stop: _StopFlag,
                       label: str) -> tuple[float, float, Path | None]:
        st = self.state
        try:
            # every rank asks before every batch, so under DDP they leave together
            tr, va = self.evaluate(iters, should_stop=lambda: bool(
                distributed.agreed_signal(stop.signum, self.world, self.device)))
        except EvaluationStopped:
            self.model.train()
            stop.signum = distributed.agreed_signal(stop.signum, self.world, self.device)
            self._interrupted(stop, t_start, during=label)
        if not (math.isfinite(tr) and math.isfinite(va)):
            raise self._diverged(f"the {label.split()[-1]} gave train loss {tr}, val loss {va}")
        st.elapsed = time.perf_counter() - t_start
        st.history.append({"step": st.step, "train_loss": tr, "val_loss": va, "lr": lr,
                           "elapsed": st.elapsed})
        self.metrics_log.write(kind="eval", **st.history[-1])
        path = self.save(tr, va)
        self.emit(TrainEvent("eval", st.step, self.cfg.max_iters, train_loss=tr, val_loss=va,
                             elapsed=st.elapsed))
        return tr, va, path


def _optimizer_state_problem(optimizer, fresh: list[dict]) -> str | None:
    """What is wrong with an optimizer state just loaded (None: nothing), against the groups
    the optimizer had before (``fresh``): torch checks the groups' sizes, not that each
    setting keeps its type or that each state tensor has its parameter's shape."""
    groups = optimizer.param_groups
    if len(groups) != len(fresh):
        return f"{len(groups)} parameter groups, not {len(fresh)}"
    for i, (group, before) in enumerate(zip(groups, fresh)):
        for key, value in before.items():
            if key == "params":
                continue
            got = group.get(key)
            numbers = (int, float)
            if value is None or isinstance(value, bool):  # torch's flags: None, True, False
                ok = got is None or isinstance(got, bool)
            elif isinstance(value, numbers):
                ok = (isinstance(got, numbers) and not isinstance(got, bool)
                      and math.isfinite(got))
            elif isinstance(value, tuple):
                ok = (isinstance(got, (tuple, list)) and len(got) == len(value) and all(
                    isinstance(x, numbers) and math.isfinite(x) for x in got))
            else:
                ok = type(got) is type(value)
            if not ok:
                kind = "bool or None" if value is None or isinstance(value, bool) \
                    else type(value).__name__
                return f"group {i} setting {key!r} is not a {kind}"
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    if value.dim() and value.shape != p.shape:
                        return (f"its {key!r} is {tuple(value.shape)} for a parameter of "
                                f"{tuple(p.shape)}")
                elif isinstance(value, bool) or not isinstance(value, (int, float)):
                    return f"its {key!r} is not a tensor or number"
    return None


@contextlib.contextmanager
def _out_of_memory(doing: str):
    """Turn an allocation failure (torch's CPU allocator, or CUDA) into a one-line error."""
    try:
        yield
    except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError too
        text = str(e)
        if not (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text
                or "not enough memory" in text):
            raise
        raise OutOfMemory(f"out of memory while {doing} ({first_line(text, 100)}); lower "
                          f"--batch-size, --block-size or --n-embd") from None


def stream_seed(seed: int, *parts: int) -> int:
    """The run's seed for stream 0 (so a single process samples as it always did), a seed mixed
    from ``(seed, *parts)`` for the other streams and ranks."""
    if not any(parts):
        return seed
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def _peer_failure():
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if any(sign in text for sign in ("Connection closed by peer", "Connection reset by peer",
                                         "Broken pipe", "Timed out", "timed out",
                                         "communicator was aborted")):
            raise distributed.DistributedError(
                f"another training process failed or stopped answering "
                f"({first_line(text, 100)}); every rank stops") from None
        raise


def train(reg: Registry, model_config: ModelConfig, train_config: TrainConfig, text: str,
          **kwargs) -> TrainResult:
    """``Trainer(reg, model_config, train_config, text, **kwargs).fit()``."""
    return Trainer(reg, model_config, train_config, text, **kwargs).fit()
