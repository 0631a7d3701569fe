"""Checkpoints: weights + configs + tokenizer state in one file, written atomically.

The payload holds only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs). Writes go to a temporary file in the
same folder, are fsync'ed, then renamed over the target: a crash mid-save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from gptlab import __version__
from gptlab.core.build import build_model
from gptlab.core.config import ModelConfig, TrainConfig
from gptlab.core.errors import CheckpointError
from gptlab.core.plugins import Registry

FORMAT = "gptlab.checkpoint"
VERSION = 1
FILENAME = "ckpt.pt"  # the latest state of a run: what --resume continues from
BEST_FILENAME = "best.pt"  # the state with the lowest val loss so far


def atomic_torch_save(obj, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path, *, model, model_config: ModelConfig, train_config: TrainConfig,
                    tokenizer, metrics: dict | None = None, train_state: dict | None = None
                    ) -> Path:
    """``train_state`` (optimizer, step, RNG states, ...) makes the checkpoint resumable."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "gptlab_version": __version__,
        "model_config": model_config.to_dict(),
        "train_config": train_config.to_dict(),
        "tokenizer": {"name": tokenizer.name, "state": tokenizer.state_dict()},
        "model": model.state_dict(),
        "metrics": dict(metrics or {}),
        "train_state": train_state,
    }
    return atomic_torch_save(payload, path)


def checkpoint_path(path) -> Path:
    """Accept a run folder (holding ``ckpt.pt``) or a checkpoint file."""
    path = Path(path)
    return path / FILENAME if path.is_dir() else path


def load_checkpoint(path, map_location="cpu") -> dict:
    path = checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; train one with `gpt run`")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or not a torch file "
                              f"({first[:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a gptlab checkpoint")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version "
                              f"{ckpt.get('version')}, this gptlab reads {VERSION}")
    return ckpt


def load_model(reg: Registry, path, device="cpu", *, attention: str | None = None):
    """Rebuild ``(model, tokenizer, checkpoint)`` from a checkpoint, in eval mode on ``device``.

    ``attention`` overrides the backend the checkpoint was trained with (weights do not depend
    on it).
    """
    ckpt = load_checkpoint(path)
    mc = ModelConfig.from_dict(ckpt["model_config"])
    if attention is not None:
        mc = ModelConfig.from_dict({**mc.to_dict(), "attention": attention})
    tok_cls = reg.tokenizer(ckpt["tokenizer"]["name"])
    tokenizer = tok_cls.from_state(ckpt["tokenizer"]["state"])
    model = build_model(reg, mc, device, requires_grad=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {str(checkpoint_path(path))!r} does not match its "
                              f"model config: {str(e).splitlines()[0]}") from None
    model.eval()
    return model, tokenizer, ckpt
