"""Starting a training run: its settings (new, or resumed from a checkpoint), then its process
group, plan, run folder, text and trainer, in the order ``gpt run`` shows them.

:func:`run_settings` resolves what to train (a preset plus overrides, or a checkpoint's settings
with perhaps a new learning rate); :class:`Session` starts it step by step, so that the caller
can report between the steps. Nothing here prints.
"""

from __future__ import annotations

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
    """A run being started: joins the process group (under torchrun), makes the one pre-flight
    (:func:`~gptlab.core.planning.plan_run`: names, device, attention) and, on rank 0, holds the
    run folder; then :meth:`load_text` and :meth:`trainer`."""

    def __init__(self, reg: Registry, settings: RunSettings, *, overwrite: bool = False):
        from gptlab.core import distributed
        from gptlab.core.planning import plan_run
        from gptlab.core.devices import device_type
        from gptlab.core.runs import RunFolder

        self.reg, self.settings = reg, settings
        resume = settings.resume
        self.world = distributed.init(device_type(settings.train_config.device))
        metrics = resume.metrics if resume else {}
        self.plan = plan_run(reg, settings.model_config, settings.train_config,
                             prefer_attention=metrics.get("attention") if resume else None,
                             prefer_kernels=metrics.get("kernels", "torch") if resume else None,
                             new_run=resume is None)
        self.folder = None
        if self.world.is_main:
            same = (settings.resume_dir is not None
                    and Path(settings.resume_dir).resolve() == Path(settings.out_dir).resolve())
            self.folder = RunFolder(settings.out_dir, resume=same, overwrite=overwrite)
        self.data_path: Path | None = None

    def load_text(self, progress: Callable[[int, int], None] | None = None) -> str:
        """The run's text (``progress(done, total)`` follows a first download); the run folder
        is released if it cannot be had."""
        from gptlab.data.corpora import load_text, resolve_corpus

        try:
            self.data_path = resolve_corpus(self.settings.data, progress=progress)
            return load_text(self.data_path)
        except BaseException:
            if self.folder is not None:
                self.folder.close()
            raise

    def trainer(self, text: str, on_event: Callable | None = None):
        """The :class:`~gptlab.core.trainer.Trainer` of the run, on ``text``."""
        from gptlab.core.trainer import Trainer

        s = self.settings
        return Trainer(self.reg, s.model_config, s.train_config, text, out_dir=self.folder,
                       on_event=on_event, resume=s.resume, data_source=str(self.data_path),
                       plan=self.plan)
