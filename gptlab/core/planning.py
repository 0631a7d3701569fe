"""From names to objects: the pre-flight check of a run, and model construction.

:func:`plan_run` is the one pre-flight: it checks every name (model, tokenizer, block, norm,
MLP, position scheme, optimizer), the device, and chooses the attention backend, the layer
kernels and the matrix products (:func:`gptlab.core.selection.select`), so that choosing and a
backend's ``prepare()`` run once per run; it returns a :class:`RunPlan`.
:func:`choose_components` turns a config into the :class:`~gptlab.core.interfaces.Components` a
model is built from, and :func:`build_model` builds the model from them.
"""

from __future__ import annotations

import attrs
import torch

from gptlab.core import autotune, distributed, precision
from gptlab.core.attention import AttentionBackend, AttentionRequest
from gptlab.core.config import ModelConfig, TrainConfig
from gptlab.core.devices import AUTO, device_type, device_unavailable_reason, resolve_device
from gptlab.core.errors import BackendNotSupportedError, ConfigError, GptlabError, PluginError
from gptlab.core.interfaces import Components, DecodeRequest, LanguageModel
from gptlab.core.layer_kernels import KernelRequest, LayerKernels
from gptlab.core.matmuls import Matmul, MatmulRequest, Shapes
from gptlab.core.matmuls import measured_choice as measured_matmul
from gptlab.core.memory import check_fits
from gptlab.core.plugins import Registry, describe, plugin_part_in
from gptlab.core.selection import candidates, select


@attrs.frozen
class RunPlan:
    """What a run will use, checked before any data is read or any weight allocated."""

    model_config: ModelConfig
    train_config: TrainConfig  # as the run trains: --dtype auto resolved
    device: torch.device
    model_cls: type[LanguageModel]
    tokenizer_cls: type
    components: Components  # the parts, attention backend, layer kernels, matmul prepared
    notes: tuple[str, ...] = ()  # what auto could not consider on this machine, and why
    asked: TrainConfig | None = None  # as given (None: train_config)
    dtype_reason: str | None = None  # why --dtype auto chose the dtype

    def made_for(self, model_config: ModelConfig, train_config: TrainConfig) -> bool:
        """Whether this plan was made for these configs (as given to :func:`plan_run`)."""
        return (self.model_config, self.asked or self.train_config) == (model_config,
                                                                        train_config)

    @property
    def attention(self) -> AttentionBackend | None:
        return self.components.attention

    @property
    def layer_kernels(self) -> LayerKernels | None:
        return self.components.kernels

    @property
    def matmul(self) -> Matmul | None:
        return self.components.matmul

    @property
    def matmul_name(self) -> str | None:
        return None if self.matmul is None else self.matmul.name

    @property
    def attention_name(self) -> str | None:
        return None if self.attention is None else self.attention.name

    @property
    def kernels_name(self) -> str | None:
        return None if self.layer_kernels is None else self.layer_kernels.name


def attention_request(config: ModelConfig, device: torch.device | str, *,
                      requires_grad: bool = True,
                      dtype: torch.dtype = torch.float32) -> AttentionRequest:
    """The request a model built from ``config`` makes when trained (or run) on ``device``;
    ``dtype``: what q, k, v are (under autocast, its dtype)."""
    device = device if isinstance(device, str) else device.type
    return AttentionRequest(device=device, dtype=dtype, head_dim=config.head_dim,
                            q_len=config.block_size, k_len=config.block_size, causal=True,
                            dropout_p=config.dropout, requires_grad=requires_grad)


#: What a model without attention (the bigram) has no use for: naming any of them is an error.
TRANSFORMER_PARTS = ("block", "attention", "norm", "mlp", "position", "qk_norm", "untied_head",
                     "zero_init")


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


def resumed_choices(metrics: dict | None) -> dict:
    """``plan_run``'s ``prefer_*`` arguments for a run resumed from a checkpoint's ``metrics``
    (None: a new run): what it was trained with. A checkpoint from before layer kernels or
    matmuls were chosen was trained with torch's."""
    if metrics is None:
        return {}
    return dict(prefer_attention=metrics.get("attention"),
                prefer_kernels=metrics.get("kernels", "torch"),
                prefer_matmul=metrics.get("matmul", "torch"))


def plan_run(reg: Registry, model_config: ModelConfig, train_config: TrainConfig, *,
             requires_grad: bool = True, prefer_attention: str | None = None,
             prefer_kernels: str | None = None, prefer_matmul: str | None = None,
             new_run: bool = True) -> RunPlan:
    """Check names, device and choices once; return the :class:`RunPlan`.

    A backend named for a device that is not available here is reported in the backend's own
    terms (its reasons, then "use --device cpu"); ``auto`` picks among what runs here the
    fastest on the run's shape (measured once per machine, :mod:`gptlab.core.autotune`), or
    ``prefer_attention`` (a resumed run's backend) if it runs; likewise ``prefer_kernels`` for
    ``--kernels auto`` (a checkpoint from before layer kernels resumes on ``torch``, the formulas
    it was trained with), and ``prefer_matmul`` for ``--matmul auto`` (measured on the run's
    Linear shapes, :mod:`gptlab.core.matmuls`). Under torchrun only rank 0 measures and every
    rank takes its choice.
    ``new_run``: also refuse options the model would ignore (:func:`check_no_unused_parts`).
    """
    check_names(reg, model_config, train_config, new_run=new_run)
    model_cls = reg.model(model_config.model)
    tokenizer_cls = reg.tokenizer(train_config.tokenizer)
    asked = train_config
    # named choices are checked before the device is (their reasons say more than "no GPU");
    # --dtype auto is float32 until measured, below
    dev_type = device_type(train_config.device)
    fix = "use --device cpu" if device_unavailable_reason(dev_type) else None
    dtype = torch.float32 if asked.dtype == precision.AUTO else getattr(torch, asked.dtype)
    named = _named_choices(reg, model_cls, model_config, dev_type, dtype, requires_grad, fix)
    device = resolve_device(train_config.device)
    if train_config.dtype == "float16" and device.type == "cpu":
        raise ConfigError("--dtype float16 is for GPUs: on the CPU torch computes float16 "
                          "matrix products through float32 (slower, no memory saved); use "
                          "--dtype bfloat16 or float32")
    dtype_reason = None
    if asked.dtype == precision.AUTO:
        choice = choose_dtype(reg, model_config, train_config, device)
        train_config = attrs.evolve(train_config, dtype=choice.dtype)
        dtype, dtype_reason = getattr(torch, choice.dtype), choice.reason
        if dtype != torch.float32:  # the named choices again, for the dtype taken
            named = _named_choices(reg, model_cls, model_config, device.type, dtype,
                                   requires_grad)
    attention = named.get("attention")
    if model_cls.uses_attention and attention is None:
        attention = _auto_attention(reg, model_config, train_config, device, dtype,
                                    requires_grad, prefer_attention)
    kernels = named.get("kernels") or select(reg, "layer_kernels", AUTO,
                                             KernelRequest(device=device.type, dtype=dtype),
                                             prefer=prefer_kernels)
    matmul = named.get("matmul") or _auto_matmul(reg, model_cls, model_config, train_config,
                                                 device, dtype, prefer_matmul)
    components = choose_components(reg, model_config, device, kernels=kernels(),
                                   attention=attention() if attention else None,
                                   matmul=matmul())
    autos = []  # what auto chose, to say what it could not consider here
    if model_cls.uses_attention and model_config.attention == AUTO:
        autos.append(("--attention", "attention_backends", attention_request(
            model_config, device, dtype=dtype, requires_grad=requires_grad), attention.name))
    if model_config.kernels == AUTO:
        autos.append(("--kernels", "layer_kernels",
                      KernelRequest(device=device.type, dtype=dtype), kernels.name))
    if model_config.matmul == AUTO:
        autos.append(("--matmul", "matmuls", MatmulRequest(device=device.type, dtype=dtype),
                      matmul.name))
    note = unavailable_note(reg, autos)
    return RunPlan(model_config=model_config, train_config=train_config, device=device,
                   model_cls=model_cls, tokenizer_cls=tokenizer_cls, components=components,
                   notes=(note,) if note else (), asked=asked, dtype_reason=dtype_reason)


def _named_choices(reg: Registry, model_cls: type, model_config: ModelConfig, dev_type: str,
                   dtype: torch.dtype, requires_grad: bool, fix: str | None = None) -> dict:
    """The attention backend, layer kernels and matmul ``model_config`` names (not ``auto``),
    checked against the request on ``dev_type`` in ``dtype``: {"attention": cls, ...}."""
    named = {}
    if model_cls.uses_attention and model_config.attention != AUTO:
        named["attention"] = select(reg, "attention_backends", model_config.attention,
                                    attention_request(model_config, dev_type, dtype=dtype,
                                                      requires_grad=requires_grad), fix=fix)
    if model_config.kernels != AUTO:
        named["kernels"] = select(reg, "layer_kernels", model_config.kernels,
                                  KernelRequest(device=dev_type, dtype=dtype))
    if model_config.matmul != AUTO:
        named["matmul"] = select(reg, "matmuls", model_config.matmul,
                                 MatmulRequest(device=dev_type, dtype=dtype))
    return named


def _auto_attention(reg: Registry, model_config: ModelConfig, train_config: TrainConfig,
                    device: torch.device, dtype: torch.dtype, requires_grad: bool,
                    prefer: str | None) -> type[AttentionBackend]:
    """``--attention auto``: ``prefer`` if it runs, else the fastest measured on the run's
    shape (rank 0 measures, every rank takes its choice), else the highest priority."""
    request = attention_request(model_config, device, dtype=dtype, requires_grad=requires_grad)
    work = autotune.Workload(batch=train_config.batch_size, heads=model_config.n_head)
    return _rank0_auto(reg, "attention_backends", request, prefer,
                       lambda ready: autotune.measured_choice(ready, request, work))


def _auto_matmul(reg: Registry, model_cls: type, model_config: ModelConfig,
                 train_config: TrainConfig, device: torch.device, dtype: torch.dtype,
                 prefer: str | None) -> type[Matmul]:
    """``--matmul auto``: ``prefer`` if it runs, else the fastest measured on the transformer's
    Linear shapes (rank 0 measures, every rank takes its choice), else the highest priority."""
    request = MatmulRequest(device=device.type, dtype=dtype)
    shapes = Shapes.of_transformer(train_config.batch_size, model_config.block_size,
                                   model_config.n_embd)
    return _rank0_auto(reg, "matmuls", request, prefer,
                       (lambda ready: measured_matmul(ready, request, shapes))
                       if model_cls.uses_attention else None)


def _rank0_auto(reg: Registry, kind: str, request, prefer: str | None, measure) -> type:
    """``auto`` for ``kind``: ``prefer`` if it runs, else ``measure``'s choice among those that
    run (on rank 0 only, and unless ``GPTLAB_AUTO=priority``; None: not measured), else the
    highest priority; every rank takes rank 0's choice."""
    world = distributed.current()
    if world.rank or not autotune.measuring():
        measure = None
    chosen = select(reg, kind, AUTO, request, prefer=prefer, measure=measure)
    agreed = distributed.rank0_choice(chosen.name, world)
    return chosen if agreed == chosen.name else select(reg, kind, agreed, request)


def choose_dtype(reg: Registry, model_config: ModelConfig, train_config: TrainConfig,
                 device: torch.device) -> precision.Choice:
    """``--dtype auto`` (:mod:`gptlab.core.precision`): float32 or bfloat16, as measured on the
    run's model with the attention backend and layer kernels each dtype would get (``auto``:
    the highest priority that runs). Under torchrun rank 0 measures and every rank takes its
    choice."""
    world = distributed.current()
    choice = precision.without_measuring(device, autotune.measuring() and not world.rank)
    if choice is None:
        choice = _measure_dtype(reg, model_config, train_config, device)
    agreed = distributed.rank0_choice(choice.dtype, world)
    return choice if agreed == choice.dtype else precision.Choice(agreed, "auto: rank 0's")


def _measure_dtype(reg: Registry, model_config: ModelConfig, train_config: TrainConfig,
                   device: torch.device) -> precision.Choice:
    """Time the run's model in float32 and bfloat16, each with the attention backend and layer
    kernels and matrix products it would get (``auto``: the highest priority that runs)."""
    mc = model_config if model_config.vocab_size else attrs.evolve(model_config, vocab_size=128)
    model_cls = reg.model(mc.model)
    try:
        # used: each dtype's parts by name and build, for the key (new kernels are timed anew)
        parts, used = {}, ""
        for d in ("float32", "bfloat16"):
            dt = getattr(torch, d)
            areq = attention_request(mc, device, dtype=dt)
            kreq = KernelRequest(device=device.type, dtype=dt)
            attention = select(reg, "attention_backends", mc.attention, areq)
            kernels = select(reg, "layer_kernels", mc.kernels, kreq)
            mreq = MatmulRequest(device=device.type, dtype=dt)
            matmul = select(reg, "matmuls", mc.matmul, mreq)
            parts[d] = choose_components(reg, mc, device, attention=attention(),
                                         kernels=kernels(), matmul=matmul())
            att = f"{attention.name}{attention.measure_tag(areq)}" \
                if parts[d].attention else "-"
            used += (f" | {d}: {att}, {kernels.name}{kernels.measure_tag(kreq)}, "
                     f"{matmul.name}{matmul.measure_tag(mreq)}")
    except BackendNotSupportedError as e:  # a named backend or kernels that take float32 only
        return precision.Choice("float32", f"auto: {e.args[0].splitlines()[0]}")

    # the measurement builds the model: a run that cannot fit is refused first, in one line
    check_fits(lambda: model_cls(mc, parts["float32"]), mc, train_config, device)

    def build(dtype: str) -> LanguageModel:
        with torch.random.fork_rng(devices=[]):  # the run's own init is not disturbed
            torch.manual_seed(0)
            return model_cls(mc, parts[dtype]).to(device)

    tag = ", ".join(f"{k}={getattr(mc, k)}" for k in (
        "model", "n_layer", "n_head", "n_embd", "block", "norm", "mlp", "position", "qk_norm"))
    return precision.choose(build, device, train_config.batch_size, mc.block_size,
                            mc.vocab_size, tag + used)


def check_names(reg: Registry, model_config: ModelConfig, train_config: TrainConfig, *,
                new_run: bool = True) -> None:
    """The first and cheapest part of the pre-flight, before any text is read: every name the
    configs give is registered, and the parts fit together (one-line errors)."""
    if new_run:
        check_no_unused_parts(reg, model_config)
    model_cls = reg.model(model_config.model)
    reg.tokenizer(train_config.tokenizer)
    if model_cls.uses_attention:
        chosen_parts(reg, model_config)  # unknown names, impossible combinations: one line
        if model_config.attention != AUTO:
            reg.attention_backend(model_config.attention)
    if model_config.kernels != AUTO:
        reg.layer_kernel(model_config.kernels)
    if model_config.matmul != AUTO:
        reg.get("matmuls", model_config.matmul)
    reg.get("optimizers", train_config.optimizer)


def unavailable_note(reg: Registry, autos) -> str | None:
    """One line saying what ``auto`` could not consider because this machine cannot run it (a
    compiler or library missing for the request's device), for each ``(flag, kind, request,
    chosen name)``; None if it could consider every implementation made for the device."""
    runs, names, reasons = [], [], []
    for flag, kind, request, chosen in autos:
        passed = []
        for cls, _ in candidates(reg, kind, request):
            if cls.name == chosen or request.device not in cls.devices:
                continue
            try:
                missing = list(cls.unavailable_reasons(request.device))
            except Exception:  # a plugin's bug: its reasons in `gpt backends` say it
                continue
            if missing:
                passed.append(cls.name)
                reasons.extend(r for r in missing if r not in reasons)
        if passed:
            runs.append(f"{flag} auto runs {chosen}")
            names.extend(passed)
    if not runs:
        return None
    return (f"{' and '.join(runs)}: {', '.join(names)} cannot run on this machine "
            f"({'; '.join(reasons)})")


def chosen_parts(reg: Registry, config: ModelConfig) -> dict:
    """The block, norm, MLP and position classes ``config`` names, looked up in the registry
    and checked against it, as keyword arguments of :class:`Components`."""
    position = reg.get("positions", config.position)
    position.check(config)
    return dict(block=reg.block(config.block), norm_class=reg.get("norms", config.norm),
                mlp_class=reg.get("mlps", config.mlp), position=position)


def choose_components(reg: Registry, config: ModelConfig, device: torch.device | str = "cpu", *,
                      attention: AttentionBackend | None = None,
                      kernels: LayerKernels | None = None, matmul: Matmul | None = None,
                      requires_grad: bool = True) -> Components:
    """The parts ``config`` names, looked up in the registry and checked (unknown names and
    impossible combinations are one-line errors), with the attention backend, layer kernels and
    matmul given or chosen here for ``device`` (``config.attention``, ``config.kernels``,
    ``config.matmul``), and the fused decoder that fits them (if any)."""
    device = torch.device(device)
    model_cls = reg.model(config.model)
    if kernels is None:
        kernels = select(reg, "layer_kernels", config.kernels,
                         KernelRequest(device=device.type))()
    if matmul is None:
        matmul = select(reg, "matmuls", config.matmul, MatmulRequest(device=device.type))()
    if not model_cls.uses_attention:
        return Components(kernels=kernels, matmul=matmul)
    if attention is None:
        attention = select(reg, "attention_backends", config.attention,
                           attention_request(config, device, requires_grad=requires_grad))()
    parts = Components(attention=attention, kernels=kernels, matmul=matmul,
                       **chosen_parts(reg, config))
    request = DecodeRequest(device=device.type, dtype=torch.float32, model=model_cls,
                            config=config, components=parts)
    decoder = select(reg, "decoders", AUTO, request, required=False)
    return attrs.evolve(parts, decoder=decoder)


def build_model(reg: Registry, config: ModelConfig, device: torch.device | str = "cpu", *,
                components: Components | None = None,
                requires_grad: bool = True) -> LanguageModel:
    """Build ``config.model`` on ``device`` from ``components`` (a :class:`RunPlan`'s), or from
    the parts :func:`choose_components` chooses for ``device``."""
    if components is None:
        components = choose_components(reg, config, device, requires_grad=requires_grad)
    try:
        model = reg.model(config.model)(config, components)
    except GptlabError:
        raise
    except Exception as e:  # a plugin's part that cannot be built is one line naming it
        part = plugin_part_in(reg, e)
        if part is None:
            raise
        raise PluginError(f"{part} failed while the model was built ({describe(e)}); fix the "
                          f"plugin, or choose another part") from None
    return model.to(device)
