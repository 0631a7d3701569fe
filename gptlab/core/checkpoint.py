"""The checkpoint format: the one place that defines what a checkpoint file holds, and the one
validator every reader goes through.

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
     "metrics": {"step", "train_loss", "val_loss", "elapsed", "attention", "kernels",
                 "matmul"}}

A checkpoint is untrusted input: a file from elsewhere, damaged or forged, must be one
``CheckpointError`` naming it, never a traceback, and must not make gptlab allocate more than it
holds. So every reader (``gpt sample``, ``gpt eval``, ``gpt bench generate``, ``gpt run
--resume``, :func:`load_model`) goes through the same checks, in this order, before anything is
built: the file (:func:`load_checkpoint`: a zip archive of stored entries as ``torch.save``
writes, no larger than the memory available, read with ``weights_only``); the payload's schema
(:meth:`Checkpoint.from_payload`: every field's type and range, the configs through their own
validators, RNG states of the generators' size, a tokenizer named as the train config names it);
then, given the registry, the parts it names are installed, its tokenizer state loads and has
the model's vocabulary (:func:`restore_tokenizer`), and its weights have exactly the names,
shapes and dtypes of the model its config builds, built first on the meta device, where nothing
is allocated (:func:`check_weights`), and that model fits in memory.
"""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path

import attrs
import torch

from gptlab import __version__
from gptlab.core import planning
from gptlab.core.planning import build_model, choose_components
from gptlab.core.config import ModelConfig, TrainConfig
from gptlab.core.devices import AUTO
from gptlab.core.errors import (BackendNotSupportedError, CheckpointError, ConfigError,
                                GptlabError, UnknownComponentError, command, first_line,
                                printable)
from gptlab.core.files import atomic_write
from gptlab.core.memory import GIB, available_bytes
from gptlab.core.runs import CHECKPOINT

FORMAT = "gptlab.checkpoint"
VERSION = 2
PAYLOAD_KEYS = ("model_config", "train_config", "tokenizer", "model", "optimizer",
                "train_state", "metrics")
MAX_TEXT = 4096  # characters of any string a checkpoint holds (paths, names, versions)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Malformed(CheckpointError):
    """A field of a checkpoint's payload is not what gptlab writes (named by its path, e.g.
    ``train_state.step``); :meth:`Checkpoint.from_payload` names the file too."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")


def _integer(field: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**63:
        raise _Malformed(field, f"is not an integer >= {low}")
    return value


def _number(field: str, value, *, finite: bool = True, low: float | None = None) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or isinstance(value, int) and not -2**63 <= value < 2**63 or math.isnan(value)
            or finite and math.isinf(value) or low is not None and value < low):
        raise _Malformed(field, f"is not a {'finite ' if finite else ''}number"
                                f"{f' >= {low:g}' if low is not None else ''}")
    return value


def _text(field: str, value, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        raise _Malformed(field, f"is not a name or path (a string of 1 to {MAX_TEXT} "
                                f"characters)")
    return value


def _mapping(field: str, value) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _Malformed(field, "is not a mapping of names to values")
    return value


def _plain(field: str, value) -> dict:
    """A mapping of names to plain values (what a config, a metrics or history record holds):
    None, booleans, numbers, strings of at most MAX_TEXT characters."""
    for key, v in _mapping(field, value).items():
        if not (v is None or isinstance(v, (bool, float))
                or isinstance(v, int) and -2**63 <= v < 2**63
                or isinstance(v, str) and len(v) <= MAX_TEXT):
            raise _Malformed(f"{field}.{key[:40]}", "is not a plain value (a number, string, "
                                                    "boolean or None)")
    return value


def _rng_state(field: str, value, size: int) -> torch.Tensor:
    if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1
            and value.numel() == size and value.layout == torch.strided):
        raise _Malformed(field, f"is not a random generator state (a uint8 tensor of {size} "
                                f"bytes)")
    return value


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
        """The state saved as ``d``; a CheckpointError if a field is missing or not of its
        type and range."""
        d = dict(_mapping("train_state", d))
        if "batch_rng" in d:  # written before several samplers: it was stream 0's
            d["batch_rngs"] = [d.pop("batch_rng")]
        d.setdefault("scaler", None)
        d.setdefault("train_time", d.get("elapsed", 0.0))  # written before --time-budget
        names = attrs.fields_dict(cls)
        missing = sorted(set(names) - set(d))
        if missing:
            raise CheckpointError(f"the checkpoint's training state lacks {', '.join(missing)}")
        st = cls(**{k: d[k] for k in names})
        st.validate()
        return st

    def validate(self) -> None:
        """Check every field's type and range (a _Malformed CheckpointError names the first
        that is wrong)."""
        _integer("train_state.step", self.step)
        _number("train_state.best_val", self.best_val, finite=False)
        _number("train_state.elapsed", self.elapsed, low=0)
        _number("train_state.train_time", self.train_time, low=0)
        gen_size = torch.Generator().get_state().numel()
        if not isinstance(self.batch_rngs, list) or not self.batch_rngs:
            raise _Malformed("train_state.batch_rngs", "is not a list of generator states")
        for i, state in enumerate(self.batch_rngs):
            _rng_state(f"train_state.batch_rngs[{i}]", state, gen_size)
        _rng_state("train_state.torch_rng", self.torch_rng, torch.get_rng_state().numel())
        if self.scaler is not None:
            for key, value in _plain("train_state.scaler", self.scaler).items():
                _number(f"train_state.scaler.{key[:40]}", value)
        _text("train_state.data_source", self.data_source, optional=True)
        if self.data_sha256 is not None and not (isinstance(self.data_sha256, str)
                                                 and _SHA256.fullmatch(self.data_sha256)):
            raise _Malformed("train_state.data_sha256", "is not a SHA-256 (64 hex digits)")
        if not isinstance(self.history, list):
            raise _Malformed("train_state.history", "is not a list of evaluation records")
        for i, record in enumerate(self.history):
            field = f"train_state.history[{i}]"
            _plain(field, record)
            _integer(f"{field}.step", record.get("step"))
            for key in ("train_loss", "val_loss"):
                _number(f"{field}.{key}", record.get(key))


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

    @property
    def where(self) -> str:
        """How messages name it: its path, quoted."""
        return repr(str(self.path)) if self.path is not None else "checkpoint"

    def finished(self) -> bool:
        """Whether the run it holds has nothing left to do: its final evaluation is recorded
        (at ``max_iters`` steps, or once its ``time_budget`` was spent)."""
        st, tc = self.train_state, self.train_config
        if st is None or not st.history or st.history[-1]["step"] != st.step:
            return False
        return st.step >= tc.max_iters or 0 < tc.time_budget <= st.train_time

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
        """The checkpoint a loaded payload holds, every field checked against the format (see
        the module docstring); a one-line CheckpointError naming the file otherwise."""
        where = repr(str(path)) if path is not None else "checkpoint"
        fmt = payload.get("format") if isinstance(payload, dict) else None
        if not (isinstance(fmt, str) and fmt == FORMAT):
            raise CheckpointError(f"{where} is not a gptlab checkpoint")
        version = payload.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version != VERSION:
            known = isinstance(version, int) and not isinstance(version, bool)
            age = ("an unknown" if not known else "an older" if version < VERSION
                   else "a newer")
            shown = version if known and abs(version) < 10**9 else "unknown"
            writer = payload.get("gptlab_version")
            writer = printable(writer[:40]) if isinstance(writer, str) else "unknown"
            raise CheckpointError(
                f"checkpoint {where} has format version {shown} (written by {age} gptlab, "
                f"{writer}); this gptlab {__version__} reads version {VERSION}: use the gptlab "
                f"that wrote it, or train again")
        missing = [k for k in PAYLOAD_KEYS if k not in payload]
        if missing:
            raise CheckpointError(f"checkpoint {where} is incomplete (missing {missing[0]!r}); "
                                  f"it was not written by gptlab {__version__}")
        try:
            return cls._from_fields(payload, path)
        except _Malformed as e:
            raise CheckpointError(f"checkpoint {where} is damaged or was not written by gptlab: "
                                  f"{e}") from None
        except ConfigError as e:
            raise CheckpointError(f"checkpoint {where} holds an invalid config: "
                                  f"{first_line(str(e))}") from None

    @classmethod
    def _from_fields(cls, payload: dict, path: Path | None) -> Checkpoint:
        model_config = ModelConfig.from_dict(_plain("model_config", payload["model_config"]))
        train_config = TrainConfig.from_dict(_plain("train_config", payload["train_config"]))
        tok = _mapping("tokenizer", payload["tokenizer"])
        name = _text("tokenizer.name", tok.get("name"))
        if name != train_config.tokenizer:
            raise _Malformed("tokenizer.name", f"{name[:40]!r} is not the tokenizer its train "
                                               f"config names ({train_config.tokenizer!r})")
        state = _mapping("tokenizer.state", tok.get("state"))
        model = _mapping("model", payload["model"])
        if not model:
            raise _Malformed("model", "holds no weights")
        for key, value in model.items():
            if not isinstance(value, torch.Tensor) or value.layout != torch.strided \
                    or value.is_quantized:
                raise _Malformed(f"model[{key[:80]!r}]", "is not a dense tensor")
        optimizer = payload["optimizer"]
        if optimizer is not None:
            _mapping("optimizer", optimizer)
        train_state = payload["train_state"]
        if train_state is not None:
            train_state = TrainState.from_dict(train_state)
            if len(train_state.batch_rngs) % train_config.grad_accum:
                raise _Malformed("train_state.batch_rngs", f"holds {len(train_state.batch_rngs)} "
                                 f"samplers, not a multiple of grad_accum "
                                 f"{train_config.grad_accum}")
        metrics = _plain("metrics", payload["metrics"])
        for key in ("attention", "kernels", "matmul"):
            if metrics.get(key) is not None:
                _text(f"metrics.{key}", metrics[key])
        return cls(model_config=model_config, train_config=train_config, tokenizer_name=name,
                   tokenizer_state=state, model=model, optimizer=optimizer,
                   train_state=train_state, metrics=dict(metrics), path=path)


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
        if path.exists():
            kept = (f"the previous one is intact); free some space, then continue with "
                    f"`{command('run', '--resume', path.parent)}`")
        else:
            kept = "nothing was saved); free some space and start the run again"
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror} ({kept}") from None


def load_checkpoint(path, map_location="cpu") -> Checkpoint:
    """Read a checkpoint file (or a run folder's ``ckpt.pt``) and check it against the format;
    errors name the file. Memory is bounded by the file's size: an archive that is not a
    ``torch.save`` one (compressed entries, data beyond the file) is refused before it is
    read."""
    path = checkpoint_path(path)
    where = repr(str(path))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {where} does not exist; train one with `gpt run`")
    _check_archive(path, where)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch's reader meets anything here: every failure means the same
        why = first_line(_describe(e), 100) or type(e).__name__
        raise CheckpointError(f"checkpoint {where} is truncated or not a torch file "
                              f"({why})") from None
    return Checkpoint.from_payload(payload, path)


def _describe(e: BaseException) -> str:
    try:
        return str(e)
    except Exception:
        return type(e).__name__


def _check_archive(path: Path, where: str) -> None:
    """``torch.save`` writes a zip archive of stored (uncompressed) entries: anything else, or
    one that claims more data than the file holds or than memory can take, is refused before
    torch reads it."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
        size = path.stat().st_size
    except Exception as e:  # zipfile meets anything here too
        why = first_line(_describe(e), 100) or type(e).__name__
        raise CheckpointError(f"checkpoint {where} is truncated or not a torch file ({why})"
                              ) from None
    if any(e.compress_type != zipfile.ZIP_STORED for e in entries):
        raise CheckpointError(f"checkpoint {where} is not a torch file (it holds compressed "
                              f"entries; torch.save writes none)")
    data = sum(e.file_size for e in entries)
    if data > size:
        raise CheckpointError(f"checkpoint {where} is damaged: its entries claim {data:,} bytes "
                              f"but the file has {size:,}")
    have = available_bytes(torch.device("cpu"))
    if have is not None and data > have:
        raise CheckpointError(f"checkpoint {where} holds {data / GIB:.1f} GiB but the machine "
                              f"has {have / GIB:.1f} GiB available; load it on a larger one")


# --------------------------------------------------------------------------- against the registry
def check_names(reg, ckpt: Checkpoint, config: ModelConfig | None = None) -> None:
    """Every part ``config`` (default: the checkpoint's) and the checkpoint name is installed,
    and the parts fit together (e.g. rotary positions and the head size); else a
    CheckpointError naming the part."""
    try:  # the tokenizer its train config names is its own (checked when it was read)
        planning.check_names(reg, config or ckpt.model_config, ckpt.train_config,
                             new_run=False)
    except UnknownComponentError as e:
        raise CheckpointError(f"checkpoint {ckpt.where} needs a part that is not installed: "
                              f"{e}; install the plugin that provides it") from None
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {ckpt.where} holds an invalid config: "
                              f"{first_line(str(e))}") from None


def restore_tokenizer(reg, ckpt: Checkpoint):
    """The checkpoint's tokenizer, rebuilt from its state; a CheckpointError if its plugin cannot
    read that state or its vocabulary is not the model's."""
    cls = reg.tokenizer(ckpt.tokenizer_name)
    try:
        tokenizer = cls.from_state(ckpt.tokenizer_state)
        size = tokenizer.vocab_size
    except Exception as e:  # the tokenizer plugin's code, on the checkpoint's data
        raise CheckpointError(f"checkpoint {ckpt.where} holds a {ckpt.tokenizer_name!r} "
                              f"tokenizer state that cannot be read "
                              f"({first_line(_describe(e), 100)})") from None
    if size != ckpt.model_config.vocab_size:
        raise CheckpointError(f"checkpoint {ckpt.where} holds a tokenizer of {size} symbols for "
                              f"a model with a vocabulary of {ckpt.model_config.vocab_size}; it "
                              f"is damaged or was not written by gptlab")
    return tokenizer


def check_weights(model: torch.nn.Module, ckpt: Checkpoint) -> None:
    """The checkpoint's weights have exactly the names, shapes and dtypes of ``model``'s state
    (``model`` may be built on the meta device); else a CheckpointError naming the first
    difference."""
    expected = model.state_dict()
    state = ckpt.model
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    problem = None
    if missing:
        problem = f"it lacks {missing[0]}" + (f" and {len(missing) - 1} more" if
                                              len(missing) > 1 else "")
    elif extra:
        problem = f"it holds {extra[0][:80]!r}, which its config does not make"
    else:
        for key, want in expected.items():
            got = state[key]
            if got.shape != want.shape or got.dtype != want.dtype:
                problem = (f"{key} is {tuple(got.shape)} {str(got.dtype)[6:]}, its config makes "
                           f"{tuple(want.shape)} {str(want.dtype)[6:]}")
                break
    if problem:
        raise CheckpointError(f"checkpoint {ckpt.where} does not match its model config: "
                              f"{problem}")


def check_model(reg, ckpt: Checkpoint, config: ModelConfig, components,
                device: torch.device | str) -> None:
    """Build ``config``'s model on the meta device (no memory, no random numbers) and check the
    checkpoint's weights against it and the memory it needs against what ``device`` has; a
    model that cannot be built on the meta device is checked after it is built instead."""
    device = torch.device(device)
    try:
        with torch.device("meta"):
            shape = reg.model(config.model)(config, components)
    except GptlabError as e:
        raise CheckpointError(f"checkpoint {ckpt.where} holds a config its model cannot "
                              f"build: {first_line(str(e))}") from None
    except Exception:  # a plugin model that cannot be built on meta: checked once built
        return
    check_weights(shape, ckpt)
    tensors = {id(t): t for t in [*shape.parameters(), *shape.buffers()]}.values()
    need = sum(t.numel() * t.element_size() for t in tensors)
    have = available_bytes(device)
    if have is not None and need > have:
        raise CheckpointError(f"checkpoint {ckpt.where} builds a model of {need / GIB:.1f} GiB "
                              f"but {device.type} has {have / GIB:.1f} GiB available; load it on "
                              f"a machine with more memory")


def load_model(reg, path, device="cpu", *, attention: str | None = None,
               kernels: str | None = None, matmul: str | None = None):
    """Rebuild ``(model, tokenizer, checkpoint)`` from a checkpoint, in eval mode on ``device``,
    after every check of the module docstring.

    ``attention`` overrides the backend the checkpoint was trained with (weights do not depend
    on it); ``kernels`` and ``matmul`` likewise the layer kernels and the matrix products.
    """
    for kind, name in (("attention_backends", attention), ("layer_kernels", kernels),
                       ("matmuls", matmul)):
        if name not in (None, AUTO):
            reg.get(kind, name)  # the user's own unknown name: its own one-line error
    ckpt = load_checkpoint(path)
    mc = ckpt.model_config
    if attention is not None:
        mc = attrs.evolve(mc, attention=attention)
    if kernels is not None:  # likewise the layer kernels (--kernels)
        mc = attrs.evolve(mc, kernels=kernels)
    if matmul is not None:  # and the matrix products (--matmul)
        mc = attrs.evolve(mc, matmul=matmul)
    check_names(reg, ckpt, mc)
    tokenizer = restore_tokenizer(reg, ckpt)
    try:
        components = choose_components(reg, mc, device, requires_grad=False)
    except BackendNotSupportedError as e:
        if attention is not None or kernels is not None or matmul is not None:
            raise  # the user's choice: its own message
        head, *_, reasons = str(e).splitlines()
        raise CheckpointError(f"checkpoint {ckpt.where} was trained with {head.split(';')[0]} "
                              f"({reasons.strip()}); choose another with --attention, "
                              f"--kernels or --matmul (see `gpt backends`)") from None
    check_model(reg, ckpt, mc, components, device)
    model = build_model(reg, mc, device, components=components)
    check_weights(model, ckpt)
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {ckpt.where} does not match its model config: "
                              f"{first_line(str(e))}") from None
    bad = non_finite_parameters(model)
    if bad:
        raise CheckpointError(f"checkpoint {ckpt.where} holds non-finite weights (NaN or "
                              f"inf in {bad[0]}): it was saved after training diverged; use an "
                              f"earlier checkpoint or train again with a lower --lr")
    model.eval()
    return model, tokenizer, ckpt


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding NaN or inf (empty: every weight is finite)."""
    with torch.no_grad():
        return [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
