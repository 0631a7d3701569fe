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
from gptlab.core import distributed
from gptlab.core.dispatch import (
    attention_request,
    attention_workload,
    select_attention,
    select_layer_kernels,
)
from gptlab.core.layer_kernels import KernelRequest, LayerKernels, set_layer_kernels
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
    layer_kernels: LayerKernels | None = None  # prepared; None: dispatched by build_model
    parts: dict = attrs.Factory(dict)  # norm, feedforward, position classes (model_parts)

    def components(self) -> Components:
        """The parts the model is built from (see :class:`Components`)."""
        return Components(block=self.block_cls, attention=self.attention, **self.parts)

    @property
    def attention_name(self) -> str | None:
        return None if self.attention is None else self.attention.name

    @property
    def kernels_name(self) -> str | None:
        return None if self.layer_kernels is None else self.layer_kernels.name


#: What a model without attention (the bigram) has no use for: naming any of them is an error.
TRANSFORMER_PARTS = ("block", "attention", "norm", "mlp", "position", "qk_norm", "untied_head",
                     "zero_init")


def model_parts(reg: Registry, config: ModelConfig) -> dict:
    """The norm, MLP and position classes ``config`` names, looked up in the registry and
    checked against it (unknown names and impossible combinations are one-line errors), as
    keyword arguments of :class:`Components`; empty for models without attention."""
    if not reg.model(config.model).uses_attention:
        return {}
    position = reg.get("positions", config.position)
    position.check(config)
    return dict(norm=reg.get("norms", config.norm), feedforward=reg.get("mlps", config.mlp),
                position=position)


def check_no_unused_parts(reg: Registry, config: ModelConfig) -> None:
    """A one-line error if a model without attention (the bigram) is given transformer parts,
    which it would silently ignore (new runs only: a checkpoint saved so still loads)."""
    if reg.model(config.model).uses_attention:
        return
    ignored = [f"{f.metadata['flag']} {getattr(config, f.name)}".replace(" True", "")
               for f in attrs.fields(ModelConfig)
               if f.name in TRANSFORMER_PARTS and getattr(config, f.name) != f.default]
    if ignored:
        raise ConfigError(f"the {config.model} model has no attention or blocks, so "
                          f"{', '.join(ignored)} would do nothing; drop "
                          f"{'it' if len(ignored) == 1 else 'them'} or use --model transformer")


def plan_run(reg: Registry, model_config: ModelConfig, train_config: TrainConfig, *,
             requires_grad: bool = True, prefer_attention: str | None = None,
             prefer_kernels: str | None = None, new_run: bool = True) -> RunPlan:
    """Check names, device and attention choice once; return the :class:`RunPlan`.

    A backend named for a device that is not available here is reported in the backend's own
    terms (its reasons, then "use --device cpu"); ``auto`` picks among what runs here the
    fastest on the run's shape (measured once per machine, :mod:`gptlab.core.autotune`), or
    ``prefer_attention`` (a resumed run's backend) if it runs; likewise ``prefer_kernels`` for
    ``--kernels auto`` (a checkpoint from before layer kernels resumes on ``torch``, the formulas
    it was trained with). Under torchrun only rank 0 measures and every rank takes its choice.
    ``new_run``: also refuse options the model would ignore (:func:`check_no_unused_parts`).
    """
    if new_run:
        check_no_unused_parts(reg, model_config)
    model_cls = reg.model(model_config.model)
    tokenizer_cls = reg.tokenizer(train_config.tokenizer)
    uses_attention = model_cls.uses_attention
    block_cls = reg.block(model_config.block) if uses_attention else None
    parts = model_parts(reg, model_config)
    reg.get("optimizers", train_config.optimizer)  # an unknown name: one line, before anything
    attention = None
    dtype = getattr(torch, train_config.dtype)  # q, k, v under autocast
    if uses_attention and model_config.attention != AUTO:
        dev_type = device_type(train_config.device)
        fix = "use --device cpu" if device_unavailable_reason(dev_type) else None
        attention = select_attention(reg, model_config.attention,
                                     attention_request(model_config, dev_type, dtype=dtype,
                                                       requires_grad=requires_grad), fix=fix)
    if model_config.kernels != AUTO:
        kernels = select_layer_kernels(reg, model_config.kernels,
                                       KernelRequest(device_type(train_config.device), dtype))
    device = resolve_device(train_config.device)
    if train_config.dtype == "float16" and device.type == "cpu":
        raise ConfigError("--dtype float16 is for GPUs: on the CPU torch computes float16 "
                          "matrix products through float32 (slower, no memory saved); use "
                          "--dtype bfloat16 or float32")
    if uses_attention and attention is None:
        request = attention_request(model_config, device, dtype=dtype,
                                    requires_grad=requires_grad)
        world = distributed.current()
        attention = select_attention(  # rank 0 measures; the others take its choice below
            reg, AUTO, request, prefer=prefer_attention,
            work=None if world.rank else attention_workload(model_config,
                                                            train_config.batch_size))
        agreed = distributed.rank0_choice(attention.name, world)
        if agreed != attention.name:
            attention = select_attention(reg, agreed, request)
    if model_config.kernels == AUTO:
        kernels = select_layer_kernels(reg, AUTO, KernelRequest(device.type, dtype),
                                       prefer=prefer_kernels)
    return RunPlan(model_config=model_config, train_config=train_config, device=device,
                   model_cls=model_cls, tokenizer_cls=tokenizer_cls, block_cls=block_cls,
                   attention=attention, layer_kernels=kernels, parts=parts)


def build_model(reg: Registry, config: ModelConfig, device: torch.device | str = "cpu", *,
                attention: AttentionBackend | None = None,
                layer_kernels: LayerKernels | None = None,
                requires_grad: bool = True) -> LanguageModel:
    """Build ``config.model`` with its block, attention backend and layer kernels, on
    ``device``.

    ``attention``, ``layer_kernels``: already selected ones (a :class:`RunPlan`'s); otherwise
    ``config.attention`` and ``config.kernels`` are dispatched for ``device``.
    """
    device = torch.device(device)
    model_cls = reg.model(config.model)
    components = Components()
    if model_cls.uses_attention:
        if attention is None:
            attention = select_attention(reg, config.attention,
                                         attention_request(config, device,
                                                           requires_grad=requires_grad))
        components = Components(block=reg.block(config.block), attention=attention,
                                **model_parts(reg, config))
    if layer_kernels is None:
        layer_kernels = select_layer_kernels(reg, config.kernels, KernelRequest(device.type))
    model = model_cls(config, components)
    set_layer_kernels(model, layer_kernels)
    return model.to(device)
