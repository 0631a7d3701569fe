"""Starting a training run: its settings (new, or resumed from a checkpoint), then its process
group, names, run folder, text, plan and trainer, in the order ``gpt run`` shows them: every
check that can be made comes before anything is built or a run folder changed.

:func:`run_settings` resolves what to train (a preset plus overrides, or a checkpoint's settings
with perhaps a new learning rate); :class:`Session` starts it step by step, so that the caller
can report between the steps. Nothing here prints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import attrs

from gptlab.core.checkpoint import Checkpoint, load_checkpoint
from gptlab.core.config import ModelConfig, TrainConfig, resolve_configs, split_overrides
from gptlab.core.plugins import Registry


@attrs.frozen
class RunSettings:
    """What a run trains, on what, and where it writes."""

    model_config: ModelConfig
    train_config: TrainConfig
    data: str | None  # a text file or corpus name; None: War and Peace
    out_dir: str
    resume: Checkpoint | None = None  # the checkpoint a resumed run continues
    resume_dir: str | None = None
    old_learning_rate: float | None = None  # a resumed run's, where the new one differs


def run_settings(preset: str, overrides: dict, *, data: str | None = None,
                 out_dir: str | None = None, resume_dir: str | None = None) -> RunSettings:
    """A new run from ``preset`` and ``overrides`` (config field names; None values ignored),
    or, with ``resume_dir``, the run saved there: its settings, except a ``learning_rate`` in
    ``overrides``, and its text unless ``data`` is given. ``out_dir`` None: ``out``, or the
    resumed folder."""
    if resume_dir is None:
        model_cfg, train_cfg = resolve_configs(preset, *split_overrides(overrides))
        return RunSettings(model_cfg, train_cfg, data, out_dir or "out")
    resume = load_checkpoint(resume_dir)
    train_cfg, old_lr = resume.train_config, None
    lr = overrides.get("learning_rate")
    if lr is not None:
        old_lr = train_cfg.learning_rate
        train_cfg = TrainConfig(**{**train_cfg.to_dict(), "learning_rate": lr})
    state = resume.train_state
    return RunSettings(resume.model_config, train_cfg,
                       data or (state.data_source if state else None), out_dir or resume_dir,
                       resume, resume_dir, old_lr)


class Session:
    """A run being started, checked step by step before anything is built or removed: the
    process group (under torchrun) is joined and every name checked
    (:func:`~gptlab.core.planning.check_names`, and a resumed checkpoint's), and rank 0 holds
    the run folder (refusing one that holds a run, removing nothing); :meth:`load_text` reads
    the text and sizes the run against it; :meth:`trainer` makes the pre-flight plan (which
    times the attention backends for ``auto``), checks a resumed checkpoint's weights against
    it, and builds the Trainer. The folder is released if any step fails."""

    def __init__(self, reg: Registry, settings: RunSettings, *, overwrite: bool = False):
        from gptlab.core import distributed
        from gptlab.core.checkpoint import check_names as check_checkpoint_names
        from gptlab.core.devices import device_type
        from gptlab.core.planning import check_names
        from gptlab.core.runs import RunFolder

        self.reg, self.settings = reg, settings
        resume = settings.resume
        self.world = distributed.init(device_type(settings.train_config.device))
        if resume is not None:
            check_checkpoint_names(reg, resume)
        check_names(reg, settings.model_config, settings.train_config, new_run=resume is None)
        self.plan = None
        self.folder = None
        if self.world.is_main:
            same = (settings.resume_dir is not None
                    and Path(settings.resume_dir).resolve() == Path(settings.out_dir).resolve())
            self.folder = RunFolder(settings.out_dir, resume=same, overwrite=overwrite)
        self.data_path: Path | None = None

    @property
    def finished(self) -> bool:
        """Whether the run resumed has nothing left to do (its final evaluation is saved)."""
        return self.settings.resume is not None and self.settings.resume.finished()

    def close(self) -> None:
        """Release the run folder (the Trainer releases it once it holds it)."""
        if self.folder is not None:
            self.folder.close()

    def load_text(self, progress: Callable[[int, int], None] | None = None) -> str:
        """The run's text (``progress(done, total)`` follows a first download), checked: a
        resumed run's must be the text it was trained on, and both splits must hold a window of
        ``block_size + 1`` tokens."""
        from gptlab.data.corpora import load_text, resolve_corpus

        with self._released_on_error():
            self.data_path = resolve_corpus(self.settings.data, progress=progress)
            text = load_text(self.data_path)
            self._check_text(text)
            return text

    def _check_text(self, text: str) -> None:
        from gptlab.core.checkpoint import restore_tokenizer
        from gptlab.core.sizing import check_splits
        from gptlab.data.corpora import check_same_text

        s = self.settings
        if s.resume is not None:
            st = s.resume.train_state
            if st is not None:
                check_same_text(text, st.data_sha256, st.data_source, name=str(self.data_path),
                                fix="resume with that text, or start a new run")
            tokenizer = restore_tokenizer(self.reg, s.resume)
        else:
            tokenizer = self.reg.tokenizer(s.train_config.tokenizer)()
            tokenizer.train(text)
        check_splits(len(tokenizer.encode(text)), s.model_config.block_size,
                     s.train_config.val_fraction)

    def trainer(self, text: str, on_event: Callable | None = None):
        """The :class:`~gptlab.core.trainer.Trainer` of the run, on ``text``, after the
        pre-flight plan (and, resuming, the checkpoint's weights checked against it)."""
        from gptlab.core.checkpoint import check_model
        from gptlab.core.planning import plan_run, resumed_choices
        from gptlab.core.trainer import Trainer

        s = self.settings
        resume = s.resume
        with self._released_on_error():
            self.plan = plan_run(self.reg, s.model_config, s.train_config,
                                 new_run=resume is None,
                                 **resumed_choices(resume.metrics if resume else None))
            if resume is not None:
                check_model(self.reg, resume, resume.model_config, self.plan.components,
                            self.plan.device)
        return Trainer(self.reg, s.model_config, s.train_config, text, out_dir=self.folder,
                       on_event=on_event, resume=resume, data_source=str(self.data_path),
                       plan=self.plan)

    @contextlib.contextmanager
    def _released_on_error(self):
        try:
            yield
        except BaseException:
            self.close()
            raise
