"""The ladder from the bigram to GPT: one part per rung, each measured on the same budget.

The progression of Karpathy's "Let's build GPT" (2023): a bigram table, then one causal
self-attention head, many heads concatenated and projected, a feed-forward MLP, residual
connections (He et al. 2016) with several blocks stacked, LayerNorm before each sub-layer (Ba et
al. 2016; pre-norm as in GPT-2, Radford et al. 2019), and scale, which is the ``default`` preset.
Past it, the attention kernels (the same model and loss, different time: naive, the fused
softmax, flash with its memory-efficient backward; Dao 2023) and the speedrun's modern parts (the
``speedrun`` preset).

Each :class:`Rung` is a real configuration of registered parts: a preset and ``gpt run``
settings (``--block plain``, ``--norm none``, ...), no model class of its own. It adds exactly
one named part to the rung it builds on; ``changes`` names the settings that express that part
and nothing else differs (tests/test_ladder.py checks it, and that ``gpt`` is the default
preset). :func:`run_rung` trains a rung through the same :class:`~gptlab.core.session.Session`
and :class:`~gptlab.core.trainer.Trainer` as ``gpt run`` (one run folder per rung; Ctrl-C saves
the rung's checkpoint), resumes a rung that was interrupted, skips one that finished, and scores
it on the whole val split as ``gpt eval`` does. Nothing here prints.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Callable
from pathlib import Path

import attrs

from gptlab.core.config import (ModelConfig, TrainConfig, resolve_configs, split_overrides)
from gptlab.core.errors import GptlabError
from gptlab.core.files import atomic_write
from gptlab.core.runs import CHECKPOINT

#: A finished rung's result, beside its run files.
RESULT = "rung.json"
#: The ladder's table and plot, in the ladder's folder.
TABLE, PLOT = "ladder.md", "ladder.png"
#: ``max_iters`` under a time budget: the budget stops the rung long before.
STEP_CAP = 1_000_000

#: The teaching rungs' width; the ``gpt`` rung scales it to the default preset's 192.
NARROW = 96


@attrs.frozen
class Rung:
    """One rung: ``preset`` plus ``settings`` (config field names, as ``gpt run`` takes them).

    ``adds``: what it adds to the rung it builds on (``builds_on``, default the rung before),
    and ``changes`` the settings through which it does (None: a different model altogether).
    ``own_budget``: train the preset's own steps whatever the ladder's budget (the bigram: a
    table of counts converges in seconds; fewer steps would leave it above its limit)."""

    name: str
    adds: str
    preset: str = "default"
    settings: dict = attrs.field(factory=dict)
    changes: tuple[str, ...] | None = ()
    builds_on: str | None = None
    own_budget: bool = False

    def configs(self, budget: Budget | None = None, **extra) -> tuple[ModelConfig, TrainConfig]:
        """The rung's configs; with ``budget``, as the ladder trains it (``extra``: more
        settings, e.g. ``device``)."""
        return resolve_configs(self.preset, *split_overrides(self.run_settings(budget, **extra)))

    def run_settings(self, budget: Budget | None = None, **extra) -> dict:
        """``settings``, with ``budget``'s steps or seconds (unless ``own_budget``) and
        ``extra``."""
        spent = {} if budget is None or self.own_budget else budget.settings()
        return {**self.settings, **spent, **extra}

    def command(self) -> str:
        """The ``gpt run`` options that train this rung's model (the budget aside)."""
        return " ".join([f"--preset {self.preset}", *flags(self.settings)])


def flags(settings: dict) -> list[str]:
    """``gpt run`` options for config settings: ``--n-layer 1``, ``--qk-norm``."""
    fields = {**attrs.fields_dict(ModelConfig), **attrs.fields_dict(TrainConfig)}
    out = []
    for name, value in settings.items():
        meta = fields[name].metadata
        if isinstance(value, bool):
            out.append(meta["flag"] if value else meta.get("off", "--no-" + meta["flag"][2:]))
        else:
            out.append(f"{meta['flag']} {value:g}" if isinstance(value, float)
                       else f"{meta['flag']} {value}")
    return out


_NO_PARTS = dict(norm="none", mlp="none")  # what the first transformer rungs leave out

RUNGS: tuple[Rung, ...] = (
    Rung("bigram", "a table of next-character logits: the baseline", preset="bigram",
         changes=None, own_budget=True),
    Rung("head", "token + position embeddings, one causal self-attention head (scaled "
         "dot-product, causal mask)",
         settings=dict(n_layer=1, n_head=1, n_embd=NARROW, block="single-head", **_NO_PARTS),
         changes=None),
    Rung("heads", "6 heads side by side, concatenated, then a projection",
         settings=dict(n_layer=1, n_embd=NARROW, block="plain", **_NO_PARTS),
         changes=("block", "n_head")),
    Rung("mlp", "a feed-forward MLP after the attention (Linear, GELU, Linear)",
         settings=dict(n_layer=1, n_embd=NARROW, block="plain", norm="none"),
         changes=("mlp",)),
    Rung("residual", "residual connections (x + sub-layer), 4 blocks stacked",
         settings=dict(n_embd=NARROW, norm="none"), changes=("block", "n_layer")),
    Rung("layernorm", "LayerNorm before each sub-layer and at the end (pre-norm)",
         settings=dict(n_embd=NARROW), changes=("norm",)),
    Rung("gpt", "scale: width 96 -> 192 (the default preset)", changes=("n_embd",)),
    Rung("naive", "kernels: the attention formula written out (stores T x T)",
         settings=dict(attention="naive"), changes=("attention",)),
    Rung("fused", "kernels: one fused scale + mask + softmax kernel",
         settings=dict(attention="fused"), changes=("attention",)),
    Rung("flash", "kernels: flash attention, memory-efficient backward (no T x T)",
         settings=dict(attention="flash"), changes=("attention",)),
    Rung("speedrun", "modern parts: rotary, QK-norm, ReLU², Muon, wsd; narrower (the "
         "speedrun preset)", preset="speedrun", changes=None, builds_on="gpt"),
)


def rung_names() -> list[str]:
    return [r.name for r in RUNGS]


def choose(names: str | None) -> list[Rung]:
    """The rungs named (comma-separated, in ladder order), or every rung."""
    if not names:
        return list(RUNGS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in rung_names()]
    if unknown or not wanted:
        raise GptlabError(f"unknown rung(s) {', '.join(unknown) or '(none)'}; the rungs are "
                          f"{', '.join(rung_names())}")
    return [r for r in RUNGS if r.name in wanted]


def base_of(rung: Rung) -> Rung | None:
    """The rung ``rung`` builds on (None for the first)."""
    i = rung_names().index(rung.name)
    if rung.builds_on:
        return RUNGS[rung_names().index(rung.builds_on)]
    return RUNGS[i - 1] if i else None


@attrs.frozen
class Budget:
    """Each rung's training: ``seconds`` of optimiser steps (``--budget``; the learning-rate
    schedule follows the time used) or ``iters`` steps (``--iters``)."""

    seconds: float = 0.0
    iters: int = 0

    def __attrs_post_init__(self):
        if (self.seconds > 0) == (self.iters > 0):
            raise GptlabError("give the ladder one budget per rung: --budget SECONDS or "
                              "--iters STEPS")

    def settings(self) -> dict:
        if self.seconds > 0:
            return dict(time_budget=float(self.seconds), max_iters=STEP_CAP)
        return dict(max_iters=self.iters, time_budget=0.0)

    def describe(self) -> str:
        return (f"{self.seconds:g} s of steps per rung" if self.seconds > 0
                else f"{self.iters} steps per rung")


@attrs.frozen
class RungResult:
    """What one rung measured (saved as ``rung.json`` in its run folder)."""

    rung: str
    adds: str
    command: str  # the gpt run options of its model
    settings: dict  # every setting it trained with, the budget included
    parameters: int
    steps: int
    train_seconds: float  # of optimiser steps
    tokens_per_s: float
    val_loss: float  # mean cross-entropy over the whole val split (as `gpt eval`)
    val_tokens: int
    attention: str | None
    kernels: str | None
    sample: str
    dtype: str | None = None  # of the forward passes, as --dtype auto chose it

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), indent=1, ensure_ascii=False)


class LadderInterrupted(GptlabError):
    """Ctrl-C (or SIGTERM) during a rung: its checkpoint is saved; the same ``gpt ladder`` goes
    on from there."""

    exit_code = 130


def load_result(folder: Path, settings: dict) -> RungResult | None:
    """The finished rung in ``folder`` if it trained with ``settings``; None if it has not
    finished; an error if it finished with other settings (it is never overwritten)."""
    path = folder / RESULT
    if not path.is_file():
        return None
    try:
        result = RungResult(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise GptlabError(f"{path} is not a rung result ({e}); move it away to score the "
                          f"rung again") from None
    if result.settings != settings:
        raise GptlabError(f"{folder} holds rung {result.rung} trained with other settings "
                          f"({_difference(result.settings, settings)}); rerun with those, or "
                          f"pick another --out-dir")
    return result


def _difference(old: dict, new: dict) -> str:
    keys = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
    return ", ".join(f"{k} {old.get(k)} here, {new.get(k)} asked" for k in keys)


def check_folder(rung: Rung, budget: Budget, out_dir: str | Path, *, device: str = "cpu"
                 ) -> RungResult | None:
    """What ``out_dir/<rung>`` holds for ``rung`` on ``budget``: its result if it finished
    (None if it has not); an error if it holds a rung of other settings (never overwritten),
    so that a ladder can refuse before it trains anything."""
    from gptlab.core.checkpoint import load_checkpoint

    folder = Path(out_dir) / rung.name
    done = load_result(folder, rung.run_settings(budget, device=device))
    if done is None and (folder / CHECKPOINT).is_file():
        ckpt = load_checkpoint(folder)
        saved = (attrs.evolve(ckpt.model_config, vocab_size=0), ckpt.train_config)
        model_cfg, train_cfg = rung.configs(budget, device=device)
        if train_cfg.dtype == "auto":  # a checkpoint holds the dtype auto chose
            train_cfg = attrs.evolve(train_cfg, dtype=saved[1].dtype)
        if saved != (model_cfg, train_cfg):
            raise GptlabError(f"{folder} holds a run of other settings than rung {rung.name} "
                              f"on this budget ({_config_difference(saved, model_cfg, train_cfg)})"
                              f"; rerun with the budget it was started with, or pick another "
                              f"--out-dir")
    return done


def run_rung(reg, rung: Rung, budget: Budget, out_dir: str | Path, *, data: str | None = None,
             device: str = "cpu", sample_chars: int = 80,
             on_event: Callable | None = None,
             on_stage: Callable[[str, object], None] | None = None) -> RungResult:
    """Train ``rung`` on ``budget`` in ``out_dir/<rung>`` (resuming an interrupted run there;
    a finished rung is read back, not trained again), score it on the whole val split and
    sample it. ``on_event``: the trainer's events (progress); ``on_stage(stage, value)``:
    ``"skipped"`` (the result), ``"resumed"`` (the step), ``"trainer"`` (the Trainer, before it
    trains), ``"scoring"`` ((done, total) windows)."""
    from gptlab.core.session import Session, run_settings
    from gptlab.core.trainer import TrainingInterrupted

    stage = on_stage or (lambda what, value: None)
    folder = Path(out_dir) / rung.name
    settings = rung.run_settings(budget, device=device)
    done = check_folder(rung, budget, out_dir, device=device)
    if done is not None:
        stage("skipped", done)
        return done
    if (folder / CHECKPOINT).is_file():
        setup = run_settings(rung.preset, {}, data=data, resume_dir=str(folder))
        stage("resumed", setup.resume.train_state.step if setup.resume.train_state else 0)
    else:
        setup = run_settings(rung.preset, settings, data=data, out_dir=str(folder))
    session = Session(reg, setup)
    text = session.load_text()
    trainer = session.trainer(text, on_event=on_event)
    stage("trainer", trainer)
    try:
        fit = trainer.fit()
    except TrainingInterrupted as e:
        stopped = LadderInterrupted(f"{e}, or rerun the same `gpt ladder` to go on from there")
        stopped.exit_code = e.exit_code  # 130 for Ctrl-C, 143 for SIGTERM
        raise stopped from None
    try:
        return _score(rung, settings, trainer, fit, folder, sample_chars, stage)
    except KeyboardInterrupt:
        raise LadderInterrupted(f"interrupted while scoring rung {rung.name}; its training is "
                                f"saved in {folder}: rerun the same `gpt ladder` to score it "
                                f"and go on") from None


def _config_difference(saved, model_cfg, train_cfg) -> str:
    old = {**saved[0].to_dict(), **saved[1].to_dict()}
    new = {**model_cfg.to_dict(), **train_cfg.to_dict()}
    return _difference(old, new)


def _score(rung, settings, trainer, fit, folder: Path, sample_chars: int, stage) -> RungResult:
    from gptlab.core.evaluation import evaluate_split
    from gptlab.core.generation import sample_text

    model, st, tc = fit.model, trainer.state, fit.train_config
    val_loss, count = evaluate_split(model, trainer.splits.val, batch_size=32,
                                     on_progress=lambda d, n: stage("scoring", (d, n)))
    tokens = st.step * tc.batch_size * fit.model_config.block_size * trainer.micro_batches
    sample = sample_text(model, fit.tokenizer, "", sample_chars, seed=tc.seed) \
        if sample_chars else ""
    result = RungResult(
        rung=rung.name, adds=rung.adds, command=rung.command(), settings=settings,
        parameters=model.num_parameters(), steps=st.step, train_seconds=st.train_time,
        tokens_per_s=tokens / st.train_time if st.train_time > 0 else 0.0,
        val_loss=val_loss, val_tokens=count, attention=trainer.plan.attention_name,
        kernels=trainer.plan.kernels_name, sample=sample,
        dtype=trainer.plan.train_config.dtype)
    if not math.isfinite(val_loss):
        raise GptlabError(f"rung {rung.name} scored a val loss of {val_loss}; its run is in "
                          f"{folder}")
    atomic_write(folder / RESULT, result.to_json())
    return result


# --------------------------------------------------------------------------- the table
def one_line(text: str, limit: int = 60) -> str:
    """A sample on one line of a table: newlines shown as ``⏎``, ``|`` escaped, cut."""
    return text[:limit].replace("\n", "⏎").replace("|", "\\|")


def markdown_table(results: list[RungResult]) -> str:
    """The ladder's table: one row per rung, with the change of val loss from the rung it
    builds on."""
    by_name = {r.rung: r for r in results}
    adds = {r.name: r.adds for r in RUNGS}
    lines = ["| rung | adds | parameters | steps | val loss | vs the rung before | tokens/s "
             "| dtype | attention | sample |",
             "|---|---|---:|---:|---:|---:|---:|---|---|---|"]
    for r in results:
        rung = next(x for x in RUNGS if x.name == r.rung)
        base = base_of(rung)
        prev = by_name.get(base.name) if base else None
        delta = f"{r.val_loss - prev.val_loss:+.3f}" if prev else ""
        lines.append(f"| {r.rung} | {adds.get(r.rung, r.adds)} | {r.parameters:,} | {r.steps:,} | "
                     f"{r.val_loss:.4f} | {delta} | {r.tokens_per_s:,.0f} | {r.dtype or '-'} | "
                     f"{r.attention or '-'} | `{one_line(r.sample)}` |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    """This machine in a few words: the CPU model, its vector extensions that matter for
    torch (avx2, avx512f, avx512_bf16, amx), the threads torch uses, torch's version."""
    import torch

    name, have = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == (platform.processor()
                                                                 or platform.machine()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    ext = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in have]
    threads = torch.get_num_threads()
    return (f"{name} ({os.cpu_count()} cores; {', '.join(ext) or 'no avx2'}), {threads} "
            f"thread{'s' * (threads != 1)}, torch {torch.__version__}")
