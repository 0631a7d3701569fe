"""Typed configurations (attrs, validated on construction) and the named presets.

A run is fully described by a :class:`ModelConfig` (what to build) and a :class:`TrainConfig`
(how to train it). Invalid values raise :class:`~gptlab.core.errors.ConfigError` with a one-line
message instead of failing later inside torch.
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


DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "wsd")


def _bool(instance, attribute, value):
    if not isinstance(value, bool):
        raise ConfigError(f"{_label(attribute)} must be true or false, got {value!r}")


def _name(instance, attribute, value):
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{_label(attribute)} must be a non-empty name, got {value!r}")


#: Seeds are drawn into torch generators as 64-bit integers (gptlab also uses seed + 1).
MAX_SEED = 2**63 - 1


def _field(default, validator, flag: str | None = None):
    return attrs.field(default=default, validator=validator,
                       metadata={"flag": flag} if flag else {})


@attrs.frozen(kw_only=True)
class ModelConfig:
    """What to build. ``vocab_size`` is set from the tokenizer before the model is built."""

    model: str = _field("transformer", _name, "--model")
    vocab_size: int = _field(0, _non_negative)
    block_size: int = _field(128, _positive, "--block-size")  # context length T
    n_layer: int = _field(4, _positive, "--n-layer")
    n_head: int = _field(4, _positive, "--n-head")
    n_embd: int = _field(128, _positive, "--n-embd")
    dropout: float = _field(0.0, _fraction, "--dropout")
    bias: bool = True
    block: str = _field("prenorm", _name, "--block")
    attention: str = _field("auto", _name, "--attention")
    kernels: str = _field("auto", _name, "--kernels")  # LayerNorm, bias + GELU, loss
    # parts of the transformer chosen by name (registered plugins) and switches; the defaults
    # are GPT-2's, and what a checkpoint from before these fields was trained with
    norm: str = _field("layernorm", _name, "--norm")
    mlp: str = _field("gelu", _name, "--mlp")
    position: str = _field("learned", _name, "--position")
    qk_norm: bool = _field(False, _bool, "--qk-norm")  # RMS-normalise q and k per head
    untied_head: bool = _field(False, _bool, "--untied-head")  # lm_head not tied to wte
    zero_init: bool = _field(False, _bool, "--zero-init")  # residual projections start at 0

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

    tokenizer: str = _field("char", _name, "--tokenizer")
    device: str = _field("cpu", _name, "--device")
    seed: int = _field(1337, _seed, "--seed")
    max_iters: int = _field(1000, _positive, "--iters")
    batch_size: int = _field(32, _positive, "--batch-size")
    learning_rate: float = _field(1e-3, _positive_float, "--lr")
    min_lr_ratio: float = _field(0.1, _fraction)  # floor of the decay, x lr
    # after warmup: "cosine" decay to the floor, or "wsd" (warmup-stable-decay: constant, then
    # a linear decay to the floor over the last ``warmdown`` fraction of the run)
    schedule: str = _field("cosine", _one_of(SCHEDULES), "--schedule")
    warmdown: float = _field(0.4, _fraction)
    warmup_iters: int = _field(50, _non_negative)
    weight_decay: float = _field(0.1, _fraction)
    beta1: float = _field(0.9, _fraction)
    beta2: float = _field(0.99, _fraction)
    grad_clip: float = _field(1.0, _non_negative_float)  # 0 disables clipping
    eval_interval: int = _field(250, _positive, "--eval-interval")
    eval_iters: int = _field(20, _positive)  # batches per estimate
    final_eval_iters: int = _field(200, _positive)
    val_fraction: float = _field(0.1, _fraction)
    sample_tokens: int = _field(300, _non_negative, "--sample-tokens")
    grad_accum: int = _field(1, _positive, "--grad-accum")  # micro-batches per optimiser step
    dtype: str = _field("float32", _one_of(DTYPES), "--dtype")  # autocast dtype of forward passes
    compile: bool = False  # torch.compile the model (--compile)
    # seconds of training steps (evaluations excluded): > 0 stops there, and the
    # schedule follows the fraction of it used instead of steps (max_iters is then a cap)
    time_budget: float = _field(0.0, _non_negative_float, "--time-budget")
    optimizer: str = _field("adamw", _name, "--optimizer")
    muon_lr: float = _field(0.02, _positive_float, "--muon-lr")  # Muon's peak lr
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
            train=dict(max_iters=1400, batch_size=32, learning_rate=2e-3, warmup_iters=100,
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
