"""Typed configurations (attrs, validated on construction) and the named presets.

A run is fully described by a :class:`ModelConfig` (what to build) and a :class:`TrainConfig`
(how to train it). Invalid values raise :class:`~gptlab.core.errors.ConfigError` with a one-line
message instead of failing later inside torch.
"""

from __future__ import annotations

import attrs

from gptlab.core.errors import ConfigError


def _positive(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{attribute.name} must be a positive integer, got {value!r}")


def _non_negative(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{attribute.name} must be an integer >= 0, got {value!r}")


def _fraction(instance, attribute, value):
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{attribute.name} must be in [0, 1), got {value!r}")


def _positive_float(instance, attribute, value):
    if not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{attribute.name} must be > 0, got {value!r}")


def _name(instance, attribute, value):
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{attribute.name} must be a non-empty name, got {value!r}")


@attrs.frozen(kw_only=True)
class ModelConfig:
    """What to build. ``vocab_size`` is set from the tokenizer before the model is built."""

    model: str = attrs.field(default="transformer", validator=_name)
    vocab_size: int = attrs.field(default=0, validator=_non_negative)
    block_size: int = attrs.field(default=128, validator=_positive)  # context length T
    n_layer: int = attrs.field(default=4, validator=_positive)
    n_head: int = attrs.field(default=4, validator=_positive)
    n_embd: int = attrs.field(default=128, validator=_positive)
    dropout: float = attrs.field(default=0.0, validator=_fraction)
    bias: bool = True
    block: str = attrs.field(default="prenorm", validator=_name)
    attention: str = attrs.field(default="auto", validator=_name)

    def __attrs_post_init__(self):
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"pick n_embd a multiple of n_head"
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

    tokenizer: str = attrs.field(default="char", validator=_name)
    device: str = attrs.field(default="cpu", validator=_name)
    seed: int = attrs.field(default=1337, validator=_non_negative)
    max_iters: int = attrs.field(default=1000, validator=_positive)
    batch_size: int = attrs.field(default=32, validator=_positive)
    learning_rate: float = attrs.field(default=1e-3, validator=_positive_float)
    min_lr_ratio: float = attrs.field(default=0.1, validator=_fraction)  # cosine floor, x lr
    warmup_iters: int = attrs.field(default=50, validator=_non_negative)
    weight_decay: float = attrs.field(default=0.1, validator=_fraction)
    beta1: float = attrs.field(default=0.9, validator=_fraction)
    beta2: float = attrs.field(default=0.99, validator=_fraction)
    grad_clip: float = attrs.field(default=1.0)  # 0 disables clipping
    eval_interval: int = attrs.field(default=250, validator=_positive)
    eval_iters: int = attrs.field(default=20, validator=_positive)  # batches per estimate
    final_eval_iters: int = attrs.field(default=200, validator=_positive)
    val_fraction: float = attrs.field(default=0.1, validator=_fraction)
    sample_tokens: int = attrs.field(default=300, validator=_non_negative)

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
