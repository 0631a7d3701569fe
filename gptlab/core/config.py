"""Typed configurations (attrs, validated on construction) and the named presets.

A run is fully described by a :class:`ModelConfig` (what to build) and a :class:`TrainConfig`
(how to train it). Invalid values raise :class:`~gptlab.core.errors.ConfigError` with a one-line
message instead of failing later inside torch. A field with a ``flag`` in its metadata is a
``gpt run`` option: :mod:`gptlab.options` makes it from the field's name, type, default, help,
``metavar`` and ``choices``, so each setting is declared once, here.
"""

from __future__ import annotations

import math

import attrs

from gptlab.core.errors import ConfigError


def _label(attribute) -> str:
    """How errors name a field: ``max_iters (--iters)`` where the CLI has a flag for it."""
    flag = attribute.metadata.get("flag")
    return f"{attribute.name} ({flag})" if flag else attribute.name


def _positive(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{_label(attribute)} must be a positive integer, got {value!r}")


def _layers(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LAYERS:
        raise ConfigError(f"{_label(attribute)} must be an integer in [1, {MAX_LAYERS}], got "
                          f"{value!r}")


def _non_negative(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{_label(attribute)} must be an integer >= 0, got {value!r}")


def _seed(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{_label(attribute)} must be an integer in [0, 2**63 - 1], "
                          f"got {value!r}")


def _fraction(instance, attribute, value):
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{_label(attribute)} must be in [0, 1), got {value!r}")


def _positive_float(instance, attribute, value):
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not value > 0:
        raise ConfigError(f"{_label(attribute)} must be a finite number > 0, got {value!r}")


def _non_negative_float(instance, attribute, value):
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{_label(attribute)} must be a finite number >= 0, got {value!r}")


def _one_of(choices: tuple[str, ...]):
    """A validator: the value must be one of ``choices`` (the CLI offers the same tuple)."""
    def check(instance, attribute, value):
        if value not in choices:
            raise ConfigError(f"{_label(attribute)} must be one of {', '.join(choices)}, got "
                              f"{value!r}")
    return check


DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "wsd")


def _bool(instance, attribute, value):
    if not isinstance(value, bool):
        raise ConfigError(f"{_label(attribute)} must be true or false, got {value!r}")


def _name(instance, attribute, value):
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{_label(attribute)} must be a non-empty name, got {value!r}")


#: Seeds are drawn into torch generators as 64-bit integers (gptlab also uses seed + 1).
MAX_SEED = 2**63 - 1
#: The most blocks a model may have: the memory pre-flight and the checkpoint reader build the
#: model on the meta device first, which costs time per module even there.
MAX_LAYERS = 1024


def _field(default, validator=None, flag: str | None = None, help: str | None = None, **cli):
    """An attrs field; ``flag`` (with ``help``, and ``metavar``, ``off`` for a boolean's
    off-switch) makes it a ``gpt run`` option (:mod:`gptlab.options`) and names it in errors."""
    metadata = {"flag": flag, "help": help, **cli} if flag else {}
    return attrs.field(default=default, validator=validator, metadata=metadata)


def _choice(default: str, choices: tuple[str, ...], flag: str, help: str):
    """A field whose value is one of ``choices`` (the option offers the same tuple)."""
    return _field(default, _one_of(choices), flag, help, choices=choices)


@attrs.frozen(kw_only=True)
class ModelConfig:
    """What to build. ``vocab_size`` is set from the tokenizer before the model is built."""

    model: str = _field("transformer", _name, "--model", "Model plugin: bigram or transformer.",
                        metavar="NAME")
    vocab_size: int = _field(0, _non_negative)
    block_size: int = _field(128, _positive, "--block-size",  # context length T
                             "Context length in tokens.")
    n_layer: int = _field(4, _layers, "--n-layer", "Number of transformer blocks (at most "
                          "1024).")
    n_head: int = _field(4, _positive, "--n-head", "Attention heads per block.")
    n_embd: int = _field(128, _positive, "--n-embd", "Embedding width (multiple of n-head).")
    dropout: float = _field(0.0, _fraction, "--dropout", "Dropout probability in [0, 1).")
    bias: bool = True
    block: str = _field("prenorm", _name, "--block",
                        "Transformer block plugin: prenorm (default), postnorm, plain (no "
                        "residual connections) or single-head (one head, no projection, no "
                        "residuals).", metavar="NAME")
    attention: str = _field(
        "auto", _name, "--attention",
        "Attention backend: auto picks the fastest on this machine for the run's shape "
        "(measured once, remembered); see `gpt backends`. A named backend that cannot run is "
        "an error.", metavar="NAME")
    kernels: str = _field(  # LayerNorm, bias + GELU, loss
        "auto", _name, "--kernels",
        "Layer kernels for LayerNorm, bias+GELU and the loss: native (C/CUDA), torch "
        "(hand-written PyTorch) or auto (native where it runs); see `gpt backends`.",
        metavar="NAME")
    matmul: str = _field(
        "auto", _name, "--matmul",
        "Library of the Linear layers' matrix products: onednn (float32 on the CPU), torch "
        "(F.linear) or auto (the faster on this machine for the run's shapes, measured once, "
        "remembered); see `gpt backends`.", metavar="NAME")
    # parts of the transformer chosen by name (registered plugins) and switches; the defaults
    # are GPT-2's, and what a checkpoint from before these fields was trained with
    norm: str = _field("layernorm", _name, "--norm",
                       "Norm of the blocks and the final norm: layernorm (default), rmsnorm or "
                       "none, or a plugin's (see `gpt plugins`).", metavar="NAME")
    mlp: str = _field("gelu", _name, "--mlp",
                      "MLP of the blocks: gelu (default), relu2, swiglu or none, or a "
                      "plugin's.", metavar="NAME")
    position: str = _field("learned", _name, "--position",
                           "Position scheme: learned (a table, default), rotary (on q and k) "
                           "or none, or a plugin's.", metavar="NAME")
    qk_norm: bool = _field(False, _bool, "--qk-norm",
                           "RMS-normalise each head's queries and keys before their dot "
                           "product.")
    untied_head: bool = _field(False, _bool, "--untied-head",
                               "An output head of its own instead of the token embedding's "
                               "weight.", off="--tied-head")
    zero_init: bool = _field(False, _bool, "--zero-init",
                             "Start every residual projection (and an untied head) at zero.")

    def __attrs_post_init__(self):
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd (--n-embd) {self.n_embd} must be divisible by n_head (--n-head) "
                f"{self.n_head}; pick n_embd a multiple of n_head"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**{k: v for k, v in d.items() if k in attrs.fields_dict(cls)})


@attrs.frozen(kw_only=True)
class TrainConfig:
    """How to train: optimisation, schedule, evaluation and sampling settings."""

    tokenizer: str = _field("char", _name, "--tokenizer", "Tokenizer plugin (default: char).",
                            metavar="NAME")
    device: str = _field("cpu", _name, "--device", "cpu, cuda, cuda:N or auto (default: cpu).")
    seed: int = _field(1337, _seed, "--seed", "Seed for init, batches and the sample.")
    max_iters: int = _field(1000, _positive, "--iters", "Optimiser steps.")
    batch_size: int = _field(32, _positive, "--batch-size", "Sequences per step.")
    learning_rate: float = _field(1e-3, _positive_float, "--lr",
                                  "Peak learning rate (warmup, then the --schedule's decay).",
                                  resumable=True)  # --resume may change it
    min_lr_ratio: float = _field(0.1, _fraction)  # floor of the decay, x lr
    # after warmup: "cosine" decay to the floor, or "wsd" (warmup-stable-decay: constant, then
    # a linear decay to the floor over the last ``warmdown`` fraction of the run)
    schedule: str = _choice("cosine", SCHEDULES, "--schedule",
                            "Learning-rate decay after warmup: cosine (the default) or wsd "
                            "(held at the peak, then linear over the last 40% of the run; the "
                            "speedrun preset's). Both end at the preset's floor (10% of the "
                            "peak; the speedrun's, 0).")
    warmdown: float = _field(0.4, _fraction)
    warmup_iters: int = _field(50, _non_negative)
    weight_decay: float = _field(0.1, _fraction)
    beta1: float = _field(0.9, _fraction)
    beta2: float = _field(0.99, _fraction)
    grad_clip: float = _field(1.0, _non_negative_float)  # 0 disables clipping
    eval_interval: int = _field(250, _positive, "--eval-interval",
                                "Steps between train/val loss estimates.")
    eval_iters: int = _field(20, _positive)  # batches per estimate
    final_eval_iters: int = _field(200, _positive)
    val_fraction: float = _field(0.1, _fraction)
    sample_tokens: int = _field(300, _non_negative, "--sample-tokens",
                                "Characters to generate after training (0: no sample).")
    grad_accum: int = _field(1, _positive, "--grad-accum",  # micro-batches per optimiser step
                             "Micro-batches of --batch-size per optimiser step (gradient "
                             "accumulation).")
    dtype: str = _choice("auto", DTYPES, "--dtype",  # autocast dtype of forward passes
                         "Precision of the forward passes (torch.autocast); weights, gradients "
                         "and optimizer state stay float32. auto: bfloat16 where a short "
                         "measurement of this run's model finds it faster on this machine "
                         "(remembered), else float32; the choice is saved with the run. "
                         "float16 (with a GradScaler) is for GPUs.")
    compile: bool = _field(False, None, "--compile",
                           "torch.compile the model (the first steps compile it).")
    # seconds of training steps (evaluations excluded): > 0 stops there, and the
    # schedule follows the fraction of it used instead of steps (max_iters is then a cap)
    time_budget: float = _field(0.0, _non_negative_float, "--time-budget",
                                "Train for this many seconds of optimiser steps (evaluations "
                                "not counted); the learning-rate schedule follows the time "
                                "used, so a slower machine takes fewer steps and still finishes "
                                "on time. --iters is then a cap. 0 means no budget: --iters "
                                "steps.", metavar="SECONDS")
    optimizer: str = _field("adamw", _name, "--optimizer",
                            "adamw (default) or muon (Muon for hidden matrices, AdamW for the "
                            "rest), or a plugin's.", metavar="NAME")
    muon_lr: float = _field(0.02, _positive_float, "--muon-lr",  # Muon's peak lr
                            "Muon's peak learning rate (with --optimizer muon; default 0.02).")
    muon_momentum: float = _field(0.95, _fraction)

    def to_dict(self) -> dict:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**{k: v for k, v in d.items() if k in attrs.fields_dict(cls)})


@attrs.frozen
class Preset:
    """A named starting point; command-line options override single fields."""

    name: str
    description: str
    model: dict
    train: dict


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "bigram",
            "the seed's baseline: next-char logits straight from an embedding table",
            model=dict(model="bigram", block_size=32),
            train=dict(max_iters=2000, batch_size=64, learning_rate=1e-2, warmup_iters=0,
                       weight_decay=0.0, eval_interval=500),
        ),
        Preset(
            "tiny",
            "a 2-layer transformer for a smoke run (about 20 seconds)",
            model=dict(block_size=64, n_layer=2, n_head=4, n_embd=96),
            train=dict(max_iters=600, batch_size=32, learning_rate=3e-3, warmup_iters=20,
                       eval_interval=200, eval_iters=10, final_eval_iters=50,
                       sample_tokens=200),
        ),
        Preset(
            "default",
            "a 4-layer transformer sized for a 2-core CPU (about 8 minutes)",
            model=dict(block_size=128, n_layer=4, n_head=6, n_embd=192),
            train=dict(max_iters=1600, batch_size=32, learning_rate=2e-3, warmup_iters=100,
                       eval_interval=200, eval_iters=20, final_eval_iters=100),
        ),
        Preset(
            "speedrun",
            "a narrower model (C=96) with the parts that won the ablation, trained for 530 s "
            "of steps on a warmup-stable-decay schedule (under 10 minutes in all, on a 1.5x "
            "slower machine too)",
            model=dict(block_size=128, n_layer=4, n_head=3, n_embd=96, position="rotary",
                       qk_norm=True, mlp="relu2"),
            train=dict(max_iters=1_000_000, time_budget=530.0, batch_size=32,
                       learning_rate=8e-3, schedule="wsd", warmdown=0.4, min_lr_ratio=0.0,
                       warmup_iters=30, eval_interval=250, eval_iters=10, final_eval_iters=50,
                       optimizer="muon"),
        ),
    ]
}


def resolve_configs(preset: str, model_overrides: dict, train_overrides: dict
                    ) -> tuple[ModelConfig, TrainConfig]:
    """Build validated configs from a preset name plus overrides (``None`` values are ignored)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    m = {**p.model, **{k: v for k, v in model_overrides.items() if v is not None}}
    t = {**p.train, **{k: v for k, v in train_overrides.items() if v is not None}}
    return ModelConfig(**m), TrainConfig(**t)


def split_overrides(overrides: dict) -> tuple[dict, dict]:
    """Split settings by field name into :class:`ModelConfig`'s and :class:`TrainConfig`'s."""
    model_fields, train_fields = attrs.fields_dict(ModelConfig), attrs.fields_dict(TrainConfig)
    unknown = [k for k in overrides if k not in model_fields and k not in train_fields]
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}")
    return ({k: v for k, v in overrides.items() if k in model_fields},
            {k: v for k, v in overrides.items() if k in train_fields})
