"""The checkpoint format: the one place that defines what a checkpoint file holds.

A checkpoint is one file holding a :class:`Checkpoint`: weights, both configs, the tokenizer's
state, and for a resumable run the optimizer state and a :class:`TrainState` (step, RNG states,
data position, best val loss, data source, eval history). The payload holds only tensors and
plain Python values, so it loads with ``torch.load(weights_only=True)`` (no pickled code runs).
It carries a format name and version; a file of another format version is a clear
:class:`~gptlab.core.errors.CheckpointError`. Writes are atomic
(:func:`gptlab.core.files.atomic_write`): a crash mid-save leaves the previous checkpoint intact.

Format version 2 (gptlab 0.2)::

    {"format": "gptlab.checkpoint", "version": 2, "gptlab_version": "0.3.0",
     "model_config": {...}, "train_config": {...},
     "tokenizer": {"name": "char", "state": {...}},
     "model": state_dict, "optimizer": state_dict | None,
     "train_state": TrainState.to_dict() | None,
     "metrics": {"step", "train_loss", "val_loss", "elapsed", "attention", "kernels"}}
"""

from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path

import attrs
import torch

from gptlab import __version__
from gptlab.core.planning import build_model
from gptlab.core.config import ModelConfig, TrainConfig
from gptlab.core.errors import CheckpointError, ConfigError, first_line
from gptlab.core.files import atomic_write
from gptlab.core.runs import CHECKPOINT

FORMAT = "gptlab.checkpoint"
VERSION = 2


@attrs.define
class TrainState:
    """Where a run stands, besides its weights and optimizer: enough to continue bit-exactly."""

    step: int = 0  # optimiser steps done
    best_val: float = math.inf  # lowest val loss estimated so far (what best.pt holds)
    elapsed: float = 0.0  # seconds of training so far, across resumes
    train_time: float = 0.0  # of which in optimiser steps (what --time-budget counts)
    # RNG states, filled when a checkpoint is made (the live ones are the generators'):
    # the data position: one batch sampler per micro-batch of a step (processes x grad_accum)
    batch_rngs: list[torch.Tensor] = attrs.Factory(list)
    torch_rng: torch.Tensor | None = None  # torch's global RNG (dropout) of rank 0
    scaler: dict | None = None  # the float16 GradScaler's scale and growth tracker
    data_source: str | None = None  # path of the text trained on
    data_sha256: str | None = None  # of that text (as load_text returns it): checked on resume
    history: list[dict] = attrs.Factory(list)  # one record per evaluation

    def to_dict(self) -> dict:
        return attrs.asdict(self, recurse=False)

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        d = dict(d)
        if "batch_rng" in d:  # written before several samplers: it was stream 0's
            d["batch_rngs"] = [d.pop("batch_rng")]
        d.setdefault("scaler", None)
        d.setdefault("train_time", d.get("elapsed", 0.0))  # written before --time-budget
        names = attrs.fields_dict(cls)
        missing = sorted(set(names) - set(d))
        if missing:
            raise CheckpointError(f"the checkpoint's training state lacks {', '.join(missing)}")
        return cls(**{k: d[k] for k in names})


@attrs.define
class Checkpoint:
    """What a checkpoint file holds (``path``: where it was loaded from, not saved)."""

    model_config: ModelConfig
    train_config: TrainConfig
    tokenizer_name: str
    tokenizer_state: dict
    model: dict  # the model's state_dict
    optimizer: dict | None = None  # None: not resumable (e.g. exported weights)
    train_state: TrainState | None = None
    metrics: dict = attrs.Factory(dict)
    path: Path | None = None

    def to_payload(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "gptlab_version": __version__,
            "model_config": self.model_config.to_dict(),
            "train_config": self.train_config.to_dict(),
            "tokenizer": {"name": self.tokenizer_name, "state": self.tokenizer_state},
            "model": self.model,
            "optimizer": self.optimizer,
            "train_state": None if self.train_state is None else self.train_state.to_dict(),
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_payload(cls, payload, path: Path | None = None) -> Checkpoint:
        where = repr(str(path)) if path is not None else "checkpoint"
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CheckpointError(f"{where} is not a gptlab checkpoint")
        version = payload.get("version")
        if version != VERSION:
            age = ("an unknown" if not isinstance(version, int)
                   else "an older" if version < VERSION else "a newer")
            raise CheckpointError(
                f"checkpoint {where} has format version {version} (written by {age} gptlab, "
                f"{payload.get('gptlab_version', 'unknown')}); this gptlab {__version__} reads "
                f"version {VERSION}: use the gptlab that wrote it, or train again")
        try:
            model_config = ModelConfig.from_dict(payload["model_config"])
            train_config = TrainConfig.from_dict(payload["train_config"])
            tok = payload["tokenizer"]
            state = payload["train_state"]
            return cls(model_config=model_config, train_config=train_config,
                       tokenizer_name=tok["name"], tokenizer_state=tok["state"],
                       model=payload["model"], optimizer=payload["optimizer"],
                       train_state=None if state is None else TrainState.from_dict(state),
                       metrics=dict(payload["metrics"]), path=path)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {where} is incomplete (missing {e}); it was not "
                                  f"written by gptlab {__version__}") from None
        except ConfigError as e:
            raise CheckpointError(f"checkpoint {where} holds an invalid config: {e}") from None


def checkpoint_path(path) -> Path:
    """Accept a run folder (holding ``ckpt.pt``) or a checkpoint file."""
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def save_checkpoint(path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``path`` atomically; returns the path. A write the file system
    refuses (disk full, ...) is a CheckpointError; the file at ``path`` is then unchanged."""
    payload = checkpoint.to_payload()
    path = Path(path)
    try:
        return atomic_write(path, lambda f: torch.save(payload, f))
    except OSError as e:
        kept = "the previous one is intact" if path.exists() else "nothing was written"
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror} ({kept}); free "
                              f"some space, then continue with `gpt run --resume "
                              f"{path.parent}`") from None


def load_checkpoint(path, map_location="cpu") -> Checkpoint:
    """Read a checkpoint file (or a run folder's ``ckpt.pt``); errors name the file."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; train one with `gpt run`")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError) as e:
        why = first_line(str(e), 100) or type(e).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or not a torch file "
                              f"({why})") from None
    return Checkpoint.from_payload(payload, path)


def load_model(reg, path, device="cpu", *, attention: str | None = None,
               kernels: str | None = None):
    """Rebuild ``(model, tokenizer, checkpoint)`` from a checkpoint, in eval mode on ``device``.

    ``attention`` overrides the backend the checkpoint was trained with (weights do not depend
    on it).
    """
    ckpt = load_checkpoint(path)
    mc = ckpt.model_config
    if attention is not None:
        mc = attrs.evolve(mc, attention=attention)
    if kernels is not None:  # likewise the layer kernels (--kernels)
        mc = attrs.evolve(mc, kernels=kernels)
    tokenizer = reg.tokenizer(ckpt.tokenizer_name).from_state(ckpt.tokenizer_state)
    model = build_model(reg, mc, device, requires_grad=False)
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} does not match its model config: "
                              f"{first_line(str(e))}") from None
    bad = non_finite_parameters(model)
    if bad:
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} holds non-finite weights (NaN or "
                              f"inf in {bad[0]}): it was saved after training diverged; use an "
                              f"earlier checkpoint or train again with a lower --lr")
    model.eval()
    return model, tokenizer, ckpt


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding NaN or inf (empty: every weight is finite)."""
    with torch.no_grad():
        return [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
