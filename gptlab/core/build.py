"""From names to objects: the pre-flight check of a run, and model construction.

:func:`plan_run` is the one pre-flight: it checks every name (model, tokenizer, block,
attention backend), the device and the attention choice, and returns a :class:`RunPlan` holding
what the run will use, the prepared attention backend included, so that dispatch and a
backend's ``prepare()`` run once per run. :func:`build_model` builds a model from a config and
either a plan's backend or a fresh dispatch.
"""

from __future__ import annotations

import attrs
import torch

from gptlab.core.attention import AttentionBackend
from gptlab.core.config import ModelConfig, TrainConfig
from gptlab.core.devices import AUTO, device_type, device_unavailable_reason, resolve_device
from gptlab.core.dispatch import attention_request, select_attention
from gptlab.core.errors import ConfigError
from gptlab.core.interfaces import Components, LanguageModel
from gptlab.core.plugins import Registry


@attrs.frozen
class RunPlan:
    """What a run will use, checked before any data is read or any weight allocated."""

    model_config: ModelConfig
    train_config: TrainConfig
    device: torch.device
    model_cls: type
    tokenizer_cls: type
    block_cls: type | None  # None for models without attention (bigram)
    attention: AttentionBackend | None  # prepared; None for models without attention

    @property
    def attention_name(self) -> str | None:
        return None if self.attention is None else self.attention.name


def plan_run(reg: Registry, model_config: ModelConfig, train_config: TrainConfig, *,
             requires_grad: bool = True) -> RunPlan:
    """Check names, device and attention choice once; return the :class:`RunPlan`.

    A backend named for a device that is not available here is reported in the backend's own
    terms (its reasons, then "use --device cpu"); ``auto`` picks among what runs here.
    """
    model_cls = reg.model(model_config.model)
    tokenizer_cls = reg.tokenizer(train_config.tokenizer)
    uses_attention = model_cls.uses_attention
    block_cls = reg.block(model_config.block) if uses_attention else None
    attention = None
    dtype = getattr(torch, train_config.dtype)  # q, k, v under autocast
    if uses_attention and model_config.attention != AUTO:
        dev_type = device_type(train_config.device)
        fix = "use --device cpu" if device_unavailable_reason(dev_type) else None
        attention = select_attention(reg, model_config.attention,
                                     attention_request(model_config, dev_type, dtype=dtype,
                                                       requires_grad=requires_grad), fix=fix)
    device = resolve_device(train_config.device)
    if train_config.dtype == "float16" and device.type == "cpu":
        raise ConfigError("--dtype float16 is for GPUs: on the CPU torch computes float16 "
                          "matrix products through float32 (slower, no memory saved); use "
                          "--dtype bfloat16 or float32")
    if uses_attention and attention is None:
        attention = select_attention(reg, AUTO, attention_request(model_config, device,
                                                                   dtype=dtype,
                                                                   requires_grad=requires_grad))
    return RunPlan(model_config=model_config, train_config=train_config, device=device,
                   model_cls=model_cls, tokenizer_cls=tokenizer_cls, block_cls=block_cls,
                   attention=attention)


def build_model(reg: Registry, config: ModelConfig, device: torch.device | str = "cpu", *,
                attention: AttentionBackend | None = None,
                requires_grad: bool = True) -> LanguageModel:
    """Build ``config.model`` with its block and attention backend, on ``device``.

    ``attention``: an already selected backend (a :class:`RunPlan`'s); otherwise
    ``config.attention`` is dispatched for ``device``.
    """
    device = torch.device(device)
    model_cls = reg.model(config.model)
    components = Components()
    if model_cls.uses_attention:
        if attention is None:
            attention = select_attention(reg, config.attention,
                                         attention_request(config, device,
                                                           requires_grad=requires_grad))
        components = Components(block=reg.block(config.block), attention=attention)
    return model_cls(config, components).to(device)
