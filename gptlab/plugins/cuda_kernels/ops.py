"""Torch operators over the native kernels: ``gptlab::fused_softmax`` and ``gptlab::flash_attn``
(attention), and the row-wise ``gptlab::layer_norm``, ``gptlab::cross_entropy`` and
``gptlab::bias_gelu`` (each also a Python function of the same name here, which skips the
dispatcher in eager mode: see the section of the row-wise kernels).

Registered with ``torch.library.custom_op`` (with fake implementations and autograd formulas), so
they work in eager mode, under autograd and through ``torch.compile``. The last argument,
``flavour``, picks the library: ``"native"`` runs the kernels of the tensors' device (the C
library for CPU tensors, the nvcc library for CUDA tensors, on torch's current stream);
``"cuda-emu"`` runs the CUDA kernels on CPU tensors through the emulator. Inputs are checked here
(device, dtype, shapes) so that errors are readable before any pointer reaches C.

Dtypes: the kernels compute in float32. On the CPU, bfloat16 inputs (what ``torch.autocast``
gives the attention under ``--dtype bfloat16``) are widened to float32 for the kernel and the
outputs rounded back to bfloat16; the logsumexp stays float32. The fake implementations return
exactly the shapes, dtypes and strides of the real ones, for inputs of any rank and layout
(``torch.compile`` trusts them; ``torch.library.opcheck`` compares them with the real outputs).
"""

from __future__ import annotations

import math

import torch

from gptlab.nn.attention import projection_parts
from gptlab.plugins.cuda_kernels import loader
from gptlab.plugins.cuda_kernels.build import FLAVOURS, Flavour, get_flavour
from gptlab.plugins.cuda_kernels.loader import KernelError, NativeLibrary, load

NATIVE = "native"

#: Below this many multiply-adds a CPU call runs on one thread: starting threads (and sharing
#: cores with torch's own still-spinning OpenMP workers) costs more than it saves.
MIN_WORK_PER_THREAD = 1 << 20


def _threads(work: int) -> int:
    return max(1, min(torch.get_num_threads(), work // MIN_WORK_PER_THREAD))


def native_flavour(device_type: str) -> str:
    """The kernel flavour that serves tensors of this device type with ``flavour="native"``."""
    if device_type not in ("cpu", "cuda"):
        raise KernelError(f"no native kernels for {device_type} tensors (cpu and cuda only)")
    return device_type


def _library(flavour: str, name: str, *tensors: torch.Tensor,
             lse: torch.Tensor | None = None) -> tuple[NativeLibrary, object]:
    """Check the tensors (one device, one dtype the kernels take; ``lse`` float32); return the
    library to call and the stream argument."""
    device = tensors[0].device
    if lse is not None:
        if lse.device != device:
            raise KernelError(f"{name}: tensors on different devices ({device} and "
                              f"{lse.device})")
        if lse.dtype != torch.float32:
            raise KernelError(f"{name}: lse must be float32, got "
                              f"{str(lse.dtype).replace('torch.', '')}")
    build_flavour, allowed, lib = _resolve(flavour, device)
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise KernelError(f"{name}: tensors of different dtypes "
                          f"({', '.join(sorted(str(d).replace('torch.', '') for d in dtypes))})"
                          f"; cast them to one")
    for t in tensors:
        if t.device != device:
            raise KernelError(f"{name}: tensors on different devices ({device} and {t.device})")
        if t.dtype not in allowed:
            names = " or ".join(str(d).replace("torch.", "") for d in allowed)
            raise KernelError(f"{name}: the {build_flavour.name} kernels take {names}, got "
                              f"{str(t.dtype).replace('torch.', '')}")
    return _opened(flavour, build_flavour, allowed, lib, name, device)


def _build_flavour(flavour: str, device: torch.device) -> tuple[Flavour, tuple]:
    """The build flavour that serves ``flavour`` for tensors on ``device``, and the dtypes it
    takes (the C library widens bfloat16; CUDA and the emulator take float32)."""
    build_flavour = get_flavour(native_flavour(device.type) if flavour == NATIVE else flavour)
    allowed = ((torch.float32, torch.bfloat16) if build_flavour.name == "cpu"
               else (torch.float32,))
    return build_flavour, allowed


def _open(build_flavour: Flavour, name: str,
          device: torch.device) -> tuple[NativeLibrary, object]:
    """The loaded library of ``build_flavour`` and the stream argument for tensors on
    ``device`` (a one-line error if its kernels take another device's tensors)."""
    if build_flavour.device != device.type:
        raise KernelError(f"{name}: the {build_flavour.name} kernels take "
                          f"{build_flavour.device} tensors, got {device}")
    lib = load(build_flavour)
    if build_flavour.device == "cuda":
        stream = lib.ffi.cast("void *", torch.cuda.current_stream(device).cuda_stream)
        return _OnDevice(lib, device.index), stream
    return lib, lib.ffi.NULL


class _OnDevice:
    """A CUDA library whose calls run under torch's own device guard for the tensors' GPU, so
    that torch's current device is switched and restored the torch way (restoring a device
    whose context does not exist yet only tells torch, never creates the context); the
    library's own guard then finds the right device current."""

    __slots__ = ("_lib", "_index")

    def __init__(self, lib: NativeLibrary, index: int | None):
        self._lib, self._index = lib, index

    def __getattr__(self, name):
        return getattr(self._lib, name)

    def call(self, name: str, *args) -> int:
        with torch.cuda.device(self._index):
            return self._lib.call(name, *args)


#: flavour -> (build flavour, dtypes, library) for CPU tensors, so that a call on small tensors
#: (decoding: one row) does not pay the lookups again (~12 us of a ~20 us call on the test
#: machine). An entry is used only while it is what the lookups would give: the same FLAVOURS
#: entry and the same library in loader's table (tests replace both).
_resolved: dict = {}


def _resolve(flavour: str, device: torch.device):
    """``(build flavour, dtypes, library or None)``: the library only where memoised (CPU)."""
    hit = _resolved.get(flavour) if device.type == "cpu" else None
    if hit is not None:
        build_flavour, _, lib = hit
        if (FLAVOURS.get(build_flavour.name) is build_flavour
                and loader._loaded.get(build_flavour) is lib):
            return hit
    return (*_build_flavour(flavour, device), None)


def _opened(flavour: str, build_flavour: Flavour, allowed, lib, name: str,
            device: torch.device):
    """The library and stream argument, after the checks: memoised, or opened (and memoised
    for CPU tensors)."""
    if lib is not None:
        return lib, lib.ffi.NULL
    lib, stream = _open(build_flavour, name, device)
    if device.type == "cpu":
        _resolved[flavour] = (build_flavour, allowed, lib)
    return lib, stream


def _f32(t: torch.Tensor) -> torch.Tensor:
    """A contiguous float32 view or copy of ``t`` (bfloat16 is widened: exact)."""
    return t.contiguous() if t.dtype == torch.float32 else t.float().contiguous()


def _like(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float32 result in the caller's dtype (bfloat16: rounded to nearest even)."""
    return out if out.dtype == dtype else out.to(dtype)


# ------------------------------------------------------------------------ fused softmax
@torch.library.custom_op("gptlab::fused_softmax", mutates_args=())
def fused_softmax(x: torch.Tensor, scale: float, causal: bool,
                  flavour: str = NATIVE) -> torch.Tensor:
    """softmax(scale * x + causal mask) over the last dim of (..., tq, tk)."""
    lib, stream = _library(flavour, "fused_softmax", x)
    if x.dim() < 2:
        raise KernelError(f"fused_softmax: x must be (..., tq, tk), got {tuple(x.shape)}")
    xf = _f32(x)
    tq, tk = x.shape[-2], x.shape[-1]
    y = torch.empty_like(xf)
    lib.call("gptlab_softmax_forward_f32", lib.ptr(y), lib.ptr(xf), xf.numel() // (tq * tk),
             tq, tk, scale, int(causal), stream, _threads(8 * xf.numel()))
    return _like(y, x.dtype)


@fused_softmax.register_fake
def _(x, scale, causal, flavour=NATIVE):
    return x.new_empty(x.shape)  # contiguous, like the real output


@torch.library.custom_op("gptlab::fused_softmax_backward", mutates_args=())
def fused_softmax_backward(y: torch.Tensor, dy: torch.Tensor, scale: float, causal: bool,
                           flavour: str = NATIVE) -> torch.Tensor:
    lib, stream = _library(flavour, "fused_softmax_backward", y, dy)
    if y.shape != dy.shape or y.dim() < 2:
        raise KernelError(f"fused_softmax_backward: y {tuple(y.shape)} and dy "
                          f"{tuple(dy.shape)} must be one (..., tq, tk) shape")
    yf, dyf = _f32(y), _f32(dy)
    tq, tk = y.shape[-2], y.shape[-1]
    dx = torch.empty_like(yf)
    lib.call("gptlab_softmax_backward_f32", lib.ptr(dx), lib.ptr(yf), lib.ptr(dyf),
             yf.numel() // (tq * tk), tq, tk, scale, int(causal), stream,
             _threads(4 * yf.numel()))
    return _like(dx, dy.dtype)


@fused_softmax_backward.register_fake
def _(y, dy, scale, causal, flavour=NATIVE):
    return dy.new_empty(y.shape)


def _softmax_setup(ctx, inputs, output):
    _, ctx.scale, ctx.causal, ctx.flavour = inputs
    ctx.save_for_backward(output)


def _softmax_backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return fused_softmax_backward(y, dy, ctx.scale, ctx.causal, ctx.flavour), None, None, None


fused_softmax.register_autograd(_softmax_backward, setup_context=_softmax_setup)


# ------------------------------------------------------------------------ flash attention
# q, k, v, o and the gradients are strided (ABI 4): the kernels read the views that come out of
# the model's qkv projection as they are, and write o, dq, dk, dv "heads last", memory
# (B, T, nh, hs) seen as (B, nh, T, hs), which is the layout the model concatenates heads in:
# o.transpose(1, 2).reshape(B, T, C) is then a view, not a copy (and likewise for the gradients
# on their way back to the projection).

def _strided(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a float32 (b, nh, T, d) tensor whose head dim is contiguous: 4-D inputs as they
    are (bfloat16 widened), others with their leading dims flattened into nh."""
    t = t if t.dtype == torch.float32 else t.float()
    if t.dim() != 4:
        t = t.reshape(1, -1, t.shape[-2], t.shape[-1])
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _heads_last(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty tensor of ``like``'s shape (..., T, d) laid out as the kernels write it: for
    (B, nh, T, d), memory (B, T, nh, d) transposed; for other ranks the leading dims are the
    heads of one batch (as :func:`_strided` reads them), memory (T, ..., d). The real ops and
    the fake implementations both return exactly this, for every rank."""
    dtype = dtype or like.dtype
    if like.dim() == 4:
        B, nh, T, d = like.shape
        return like.new_empty((B, T, nh, d), dtype=dtype).transpose(1, 2)
    *lead, T, d = like.shape
    out = like.new_empty((T, math.prod(lead), d), dtype=dtype).transpose(0, 1)
    return out.view(like.shape)


def _strides(lib: NativeLibrary, *tensors: torch.Tensor):
    """The int64 array of (batch, head, row) strides of each (b, nh, T, d) tensor, in order."""
    return lib.ffi.new("int64_t[]", [s for t in tensors for s in t.stride()[:3]])


def _check_qkv(name: str, q, k, v, **more: torch.Tensor) -> None:
    """One line before any pointer reaches C: q (..., tq, d), k and v (..., tk, d) with the same
    leading dims; ``more`` are named tensors that must have q's shape (o, do) or its leading
    shape (lse)."""
    if q.dim() < 2 or k.shape != v.shape or k.shape[:-2] != q.shape[:-2] \
            or k.shape[-1] != q.shape[-1]:
        raise KernelError(f"{name}: q {tuple(q.shape)}, k {tuple(k.shape)}, v "
                          f"{tuple(v.shape)} must be (..., tq, d), (..., tk, d), (..., tk, d) "
                          f"with the same batch, heads and head dim")
    for what, t in more.items():
        want = q.shape[:-1] if what == "lse" else q.shape
        if t.shape != want:
            raise KernelError(f"{name}: {what} is {tuple(t.shape)}, expected {tuple(want)}")


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                flavour: str = NATIVE) -> tuple[torch.Tensor, torch.Tensor]:
    """``gptlab::flash_attn``: returns (o, lse): o of q's shape and dtype (4-D: heads last, see
    above), lse (..., tq) float32 in natural log."""
    lib, stream = _library(flavour, "flash_attn", q, k, v)
    _check_qkv("flash_attn", q, k, v)
    qs, ks, vs = _strided(q), _strided(k), _strided(v)
    b, nh, tq, d = qs.shape
    tk = ks.shape[2]
    o = _heads_last(qs)
    lse = qs.new_empty(b * nh, tq)
    strides = _strides(lib, qs, ks, vs, o)
    lib.call("gptlab_flash_forward_f32", lib.ptr(o), lib.ptr(lse), lib.ptr(qs), lib.ptr(ks),
             lib.ptr(vs), strides, b, nh, tq, tk, d, scale, int(causal), stream,
             _threads(2 * b * nh * tq * tk * d))
    return _like(o.view(q.shape), q.dtype), lse.view(q.shape[:-1])


flash_attn = torch.library.custom_op("gptlab::flash_attn", _flash_attn, mutates_args=())


def _flash_fake(q, k, v, scale, causal, flavour=NATIVE):
    """What the forward ops (float32 and tensor-core) return: o heads last, lse float32."""
    return _heads_last(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _flash_backward_fake(do, q, k, v, o, lse, scale, causal, flavour=NATIVE):
    """What the backward ops return: dq, dk, dv heads last."""
    return _heads_last(q), _heads_last(k), _heads_last(v)


flash_attn.register_fake(_flash_fake)


def _packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether float32 q, k, v are the three parts of one (B, T, 3C) projection, as
    :class:`gptlab.nn.MultiHeadAttention` splits it (:func:`gptlab.nn.attention.projection_parts`)."""
    return all(t.dtype == torch.float32 for t in (q, k, v)) and projection_parts(q, k, v)


def _flash_attn_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         o: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool,
                         flavour: str = NATIVE, pack: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each of its input's shape and dtype (4-D: heads last). ``pack``: where q, k,
    v are the parts of one projection (:func:`_packed`), dq, dk, dv are written as the parts of
    one (B, T, 3C) gradient, so that the projection's backward takes them without a copy (the
    registered op never packs: its outputs may not alias one another)."""
    lib, stream = _library(flavour, "flash_attn_backward", do, q, k, v, o, lse=lse)
    _check_qkv("flash_attn_backward", q, k, v, o=o, do=do, lse=lse)
    qs, ks, vs, os_, dos = (_strided(t) for t in (q, k, v, o, do))
    lsef = lse.reshape(-1, q.shape[-2]).contiguous()
    b, nh, tq, d = qs.shape
    tk = ks.shape[2]
    if pack and _packed(q, k, v):
        dqkv = qs.new_empty(b, tq, 3, nh, d)  # (B, T, 3, nh, hs): the projection's layout
        dq, dk, dv = (dqkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, nh, T, hs) each
    else:
        dq, dk, dv = _heads_last(qs), _heads_last(ks), _heads_last(vs)
    ws_bytes = lib.lib.gptlab_flash_backward_workspace_size(b * nh, tq, tk, d)
    ws = qs.new_empty(max(1, -(-ws_bytes // 4)))  # allocated by torch, on the tensors' device
    strides = _strides(lib, qs, ks, vs, os_, dos, dq, dk, dv)
    lib.call("gptlab_flash_backward_f32", lib.ptr(dq), lib.ptr(dk), lib.ptr(dv),
             lib.ptr(ws, "void *"), lib.ptr(qs), lib.ptr(ks), lib.ptr(vs), lib.ptr(os_),
             lib.ptr(lsef), lib.ptr(dos), strides, b, nh, tq, tk, d, scale, int(causal), stream,
             _threads(5 * b * nh * tq * tk * d))
    return (_like(dq.view(q.shape), q.dtype), _like(dk.view(k.shape), k.dtype),
            _like(dv.view(v.shape), v.dtype))


@torch.library.custom_op("gptlab::flash_attn_backward", mutates_args=())
def flash_attn_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        o: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool,
                        flavour: str = NATIVE
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each of its input's shape and dtype (4-D: heads last)."""
    return _flash_attn_backward(do, q, k, v, o, lse, scale, causal, flavour)


flash_attn_backward.register_fake(_flash_backward_fake)


def _flash_setup(ctx, inputs, output):
    q, k, v, ctx.scale, ctx.causal, ctx.flavour = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)  # an auxiliary output: the backward has no dlse term
    ctx.save_for_backward(q, k, v, o, lse)  # O(T * hs): no T x T tensor is kept


def _flash_grads(backward_op):
    """The autograd formula of a forward op whose backward op is ``backward_op``."""
    def grads(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = backward_op(do, q, k, v, o, lse, ctx.scale, ctx.causal, ctx.flavour)
        return dq, dk, dv, None, None, None
    return grads


flash_attn.register_autograd(_flash_grads(flash_attn_backward), setup_context=_flash_setup)


def _no_grad_needed(*tensors: torch.Tensor | None) -> bool:
    """Inference (no_grad, inference_mode, or inputs that need no gradient) in eager mode: the
    entry points then call the implementation itself, with no autograd node and no dispatcher
    (decoding one token calls 17 kernels per step on one-row tensors, where that overhead was
    most of the cost)."""
    return (not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in tensors))
            and _eager(*tensors))


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    causal: bool, flavour: str = NATIVE) -> torch.Tensor:
    """o of ``gptlab::flash_attn``. In eager mode the implementation is called directly:
    without autograd in inference, else through an autograd function whose backward writes
    the gradients of q, k, v split from one projection as that projection's gradient
    (:func:`_flash_attn_backward`'s ``pack``); under tracing, the registered op."""
    if _no_grad_needed(q, k, v):
        return _flash_attn(q, k, v, scale, causal, flavour)[0]
    if _eager(q, k, v):
        return _FlashFn.apply(q, k, v, scale, causal, flavour)[0]
    return flash_attn(q, k, v, scale, causal, flavour)[0]


# ------------------------------------------------------------------------ tensor-core flash
# csrc/cuda/flash_tc.cu: the forward on tensor cores, bfloat16 or float16 q, k, v (one dtype),
# float32 accumulation and lse; head dims 64 and 128. CUDA tensors, or CPU tensors through the
# emulator (flavour="cuda-emu"); the backward (gptlab::flash_attn_tc_backward) recomputes P.
TC_DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16"}
TC_HEAD_DIMS = (64, 128)


def _tc_library(flavour: str, name: str, *tensors: torch.Tensor):
    device = tensors[0].device
    build_flavour = get_flavour(native_flavour(device.type) if flavour == NATIVE else flavour)
    if build_flavour.name == "cpu":
        raise KernelError(f"{name}: the tensor-core kernels are CUDA's: CUDA tensors, or CPU "
                          f"tensors with flavour='cuda-emu'")
    for t in tensors:
        if t.device != device:
            raise KernelError(f"{name}: tensors on different devices ({device} and {t.device})")
        if t.dtype != tensors[0].dtype or t.dtype not in TC_DTYPES:
            got = ", ".join(sorted({_dtype_name(x.dtype) for x in tensors}))
            raise KernelError(f"{name}: the tensor-core kernels take bfloat16 or float16 (one "
                              f"dtype for q, k, v), got {got}")
    return _open(build_flavour, name, device)


def _tc_operand(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a (b, nh, T, d) view the kernel can cp.async from: head dim contiguous, 16-byte
    aligned, batch/head/row strides multiples of 8 elements (of dims longer than 1); else a
    contiguous copy."""
    if t.dim() != 4:
        t = t.reshape(1, -1, t.shape[-2], t.shape[-1])
    ok = (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
          and all(n == 1 or s % 8 == 0 for n, s in zip(t.shape[:3], t.stride()[:3])))
    return t if ok else t.contiguous()


def _tc_strides(lib: NativeLibrary, *tensors: torch.Tensor):
    """As :func:`_strides`, with 0 for dims of length 1 (whose strides torch leaves free)."""
    return lib.ffi.new("int64_t[]", [0 if n == 1 else s for t in tensors
                                     for n, s in zip(t.shape[:3], t.stride()[:3])])


@torch.library.custom_op("gptlab::flash_attn_tc", mutates_args=())
def flash_attn_tc(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                  flavour: str = NATIVE) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor-core flash attention forward: (o, lse) as :func:`flash_attn` (o in q's dtype,
    4-D heads last; lse float32, natural log), for bfloat16 or float16 q, k, v."""
    lib, stream = _tc_library(flavour, "flash_attn_tc", q, k, v)
    _check_qkv("flash_attn_tc", q, k, v)
    if q.shape[-1] not in TC_HEAD_DIMS:
        raise KernelError(f"flash_attn_tc: head dim {q.shape[-1]} not supported (64 or 128)")
    qs, ks, vs = _tc_operand(q), _tc_operand(k), _tc_operand(v)
    b, nh, tq, d = qs.shape
    tk = ks.shape[2]
    o = _heads_last(qs)
    lse = qs.new_empty(b * nh, tq, dtype=torch.float32)
    lib.call(f"gptlab_flash_forward_{TC_DTYPES[q.dtype]}", lib.ptr(o, "void *"), lib.ptr(lse),
             lib.ptr(qs, "void *"), lib.ptr(ks, "void *"), lib.ptr(vs, "void *"),
             _tc_strides(lib, qs, ks, vs, o), b, nh, tq, tk, d, scale, int(causal), stream, 1)
    return o.view(q.shape), lse.view(q.shape[:-1])


flash_attn_tc.register_fake(_flash_fake)


@torch.library.custom_op("gptlab::flash_attn_tc_backward", mutates_args=())
def flash_attn_tc_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           o: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool,
                           flavour: str = NATIVE
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`flash_attn_tc`, each of its input's shape and dtype (4-D: heads
    last); dQ is summed in float32 with atomics (on a GPU not bit-deterministic)."""
    lib, stream = _tc_library(flavour, "flash_attn_tc_backward", do, q, k, v, o)
    _check_qkv("flash_attn_tc_backward", q, k, v, o=o, do=do, lse=lse)
    if lse.dtype != torch.float32 or lse.device != q.device:
        raise KernelError(f"flash_attn_tc_backward: lse must be float32 on {q.device}")
    if q.shape[-1] not in TC_HEAD_DIMS:
        raise KernelError(f"flash_attn_tc_backward: head dim {q.shape[-1]} not supported "
                          f"(64 or 128)")
    qs, ks, vs, os_, dos = (_tc_operand(t) for t in (q, k, v, o, do))
    lsef = lse.reshape(-1, q.shape[-2]).contiguous()
    b, nh, tq, d = qs.shape
    tk = ks.shape[2]
    dq, dk, dv = _heads_last(qs), _heads_last(ks), _heads_last(vs)
    ws_bytes = lib.lib.gptlab_flash_backward_workspace_size(b * nh, tq, tk, d)
    ws = qs.new_empty(max(1, -(-ws_bytes // 4)), dtype=torch.float32)
    lib.call(f"gptlab_flash_backward_{TC_DTYPES[q.dtype]}", lib.ptr(dq, "void *"),
             lib.ptr(dk, "void *"), lib.ptr(dv, "void *"), lib.ptr(ws, "void *"),
             lib.ptr(qs, "void *"), lib.ptr(ks, "void *"), lib.ptr(vs, "void *"),
             lib.ptr(os_, "void *"), lib.ptr(lsef), lib.ptr(dos, "void *"),
             _tc_strides(lib, qs, ks, vs, os_, dos, dq, dk, dv), b, nh, tq, tk, d, scale,
             int(causal), stream, 1)
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


flash_attn_tc_backward.register_fake(_flash_backward_fake)
flash_attn_tc.register_autograd(_flash_grads(flash_attn_tc_backward), setup_context=_flash_setup)


#: The eager flash backward writes the q, k, v gradients as one projection's gradient where it
#: can (False: apart, as the registered op does; ``gpt bench train`` measures the difference).
PACK_QKV_GRADIENTS = True


def _packing_backward(do, q, k, v, o, lse, scale, causal, flavour):
    return _flash_attn_backward(do, q, k, v, o, lse, scale, causal, flavour,
                                pack=PACK_QKV_GRADIENTS)


# ------------------------------------------------------------------------ row-wise kernels
# LayerNorm, softmax cross-entropy and bias + GELU (csrc/*/layernorm, cross_entropy, bias_gelu).
#
# Each is a registered op (torch.ops.gptlab.layer_norm, .cross_entropy, .bias_gelu, with fakes,
# autograd and backward ops) and a Python entry point of the same name here. In eager mode the
# entry point runs the same implementation through a torch.autograd.Function, skipping the
# dispatcher round trips of a custom op (with autograd, on tiny tensors on the 2-core test
# machine: 0.10 ms per forward through the Function, 0.22 ms through the op); under
# torch.compile, a mode (fake tensors, functionalisation), a functorch transform or a tensor
# subclass it calls the registered op, so tracing sees gptlab::* exactly.
#
# Their tensors may mix float32 and (on the CPU) bfloat16, as under autocast (bfloat16
# activations, float32 parameters): each is widened to float32 on its own. Outputs come back in
# the dtype the matching torch expression gives; parameter gradients in the parameter's dtype.

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not subclasses that override torch functions


def _eager(*tensors: torch.Tensor | None) -> bool:
    """True where the entry points may call the implementation directly: plain tensors, no
    tracing, no torch function or dispatch mode, no functorch transform."""
    return (not torch.compiler.is_compiling()
            and all(t is None or type(t) in _PLAIN for t in tensors)
            and not torch._C._len_torch_dispatch_stack()
            and not torch._C._len_torch_function_stack()
            and not torch._C._are_functorch_transforms_active())


def _rowwise_library(flavour: str, name: str, tensors: tuple, names: tuple
                     ) -> tuple[NativeLibrary, object]:
    """Check the tensors (one device; float dtypes the kernels take, not necessarily the same;
    None skipped) and return the library to call and the stream argument."""
    device = tensors[0].device
    build_flavour, allowed, lib = _resolve(flavour, device)
    for what, t in zip(names, tensors):
        if t is None:
            continue
        if t.device != device:
            raise KernelError(f"{name}: tensors on different devices ({device} and "
                              f"{t.device} for {what})")
        if t.dtype not in allowed:
            kinds = " or ".join(_dtype_name(d) for d in allowed)
            raise KernelError(f"{name}: the {build_flavour.name} kernels take {kinds}, got "
                              f"{_dtype_name(t.dtype)} for {what}")
    return _opened(flavour, build_flavour, allowed, lib, name, device)


def _expect_shape(name: str, what: str, t: torch.Tensor, shape) -> None:
    if tuple(t.shape) != tuple(shape):  # (a torch.Size compared as such goes through sym_eq)
        raise KernelError(f"{name}: {what} is {tuple(t.shape)}, expected {tuple(shape)}")


def _last_dim(name: str, what: str, x: torch.Tensor, letter: str) -> int:
    if x.dim() < 1 or x.shape[-1] < 1:
        raise KernelError(f"{name}: {what} must be (..., {letter}) with {letter} >= 1, got "
                          f"{tuple(x.shape)}")
    return x.shape[-1]


def _workspace(lib: NativeLibrary, like: torch.Tensor, size_fn: str, *sizes: int) -> torch.Tensor:
    """Caller-allocated workspace (by torch, on the tensors' device) of the size the library
    asks for."""
    nbytes = getattr(lib.lib, size_fn)(*sizes)
    return like.new_empty(max(1, -(-nbytes // 4)), dtype=torch.float32)


# ------------------------------------------------------------------------ layer norm
def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                flavour: str = NATIVE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    name = "layer_norm"
    lib, stream = _rowwise_library(flavour, name, (x, weight, bias), ("x", "weight", "bias"))
    C = _last_dim(name, "x", x, "C")
    _expect_shape(name, "weight", weight, (C,))
    if bias is not None:
        _expect_shape(name, "bias", bias, (C,))
    # every tensor whose pointer goes to C stays bound to a name until the call returns
    xf, wf, bf = _f32(x), _f32(weight), None if bias is None else _f32(bias)
    lead = x.shape[:-1]
    rows = xf.numel() // C
    y = torch.empty_like(xf)
    # (new_empty(*lead): a torch.Size argument is parsed at twice the cost of its ints)
    shape = tuple(lead) if lead else ((),)
    mean, rstd = xf.new_empty(*shape), xf.new_empty(*shape)
    if rows:
        lib.call("gptlab_layernorm_forward_f32", lib.ptr(y), lib.ptr(mean), lib.ptr(rstd),
                 lib.ptr(xf), lib.ptr(wf), lib.ptr(bf), rows, C, eps, stream,
                 _threads(8 * xf.numel()))
    return _like(y, x.dtype), mean, rstd


def _layer_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                         mean: torch.Tensor, rstd: torch.Tensor, has_bias: bool,
                         flavour: str = NATIVE
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    name = "layer_norm_backward"
    lib, stream = _rowwise_library(flavour, name, (dy, x, weight, mean, rstd),
                                   ("dy", "x", "weight", "mean", "rstd"))
    C = _last_dim(name, "x", x, "C")
    _expect_shape(name, "dy", dy, x.shape)
    _expect_shape(name, "weight", weight, (C,))
    lead = x.shape[:-1]
    for what, t in (("mean", mean), ("rstd", rstd)):
        _expect_shape(name, what, t, lead)
        if t.dtype != torch.float32:
            raise KernelError(f"{name}: {what} must be float32, got {_dtype_name(t.dtype)}")
    xf, dyf, wf = _f32(x), _f32(dy), _f32(weight)
    meanc, rstdc = mean.contiguous(), rstd.contiguous()
    rows = xf.numel() // C
    dx = torch.empty_like(xf)
    dw = xf.new_empty(C)
    db = xf.new_empty(C if has_bias else 0)
    if rows:
        ws = _workspace(lib, xf, "gptlab_layernorm_backward_workspace_size", rows, C)
        lib.call("gptlab_layernorm_backward_f32", lib.ptr(dx), lib.ptr(dw),
                 lib.ptr(db if has_bias else None), lib.ptr(ws, "void *"), lib.ptr(dyf),
                 lib.ptr(xf), lib.ptr(wf), lib.ptr(meanc), lib.ptr(rstdc), rows, C, stream,
                 _threads(16 * xf.numel()))
    else:
        dw.zero_()
        db.zero_()
    return _like(dx, x.dtype), _like(dw, weight.dtype), _like(db, weight.dtype)


layer_norm_op = torch.library.custom_op("gptlab::layer_norm", _layer_norm, mutates_args=())
layer_norm_backward = torch.library.custom_op("gptlab::layer_norm_backward", _layer_norm_backward,
                                              mutates_args=())


@layer_norm_op.register_fake
def _(x, weight, bias, eps, flavour=NATIVE):
    stats = x.shape[:-1]
    return (x.new_empty(x.shape), x.new_empty(stats, dtype=torch.float32),
            x.new_empty(stats, dtype=torch.float32))


@layer_norm_backward.register_fake
def _(dy, x, weight, mean, rstd, has_bias, flavour=NATIVE):
    C = x.shape[-1]
    return x.new_empty(x.shape), weight.new_empty(C), weight.new_empty(C if has_bias else 0)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, ctx.eps, ctx.flavour = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)  # saved statistics: the backward has no term for them
    ctx.set_materialize_grads(False)  # no zero tensors made for d(mean), d(rstd)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, mean, rstd)


def _layer_norm_grads(backward_fn):
    def grads(ctx, dy, dmean, drstd):
        if dy is None:  # y was not used
            return None, None, None, None, None
        x, weight, mean, rstd = ctx.saved_tensors
        has_bias = ctx.bias_dtype is not None
        dx, dw, db = backward_fn(dy, x, weight, mean, rstd, has_bias, ctx.flavour)
        return dx, dw, (_like(db, ctx.bias_dtype) if has_bias else None), None, None
    return grads


layer_norm_op.register_autograd(_layer_norm_grads(layer_norm_backward),
                                setup_context=_layer_norm_setup)


def _eager_function(impl, setup, backward) -> type[torch.autograd.Function]:
    """The eager path of an op: the same implementation and formulas, no dispatcher. (A
    ctx-first forward: with a separate setup_context, apply costs 3x more Python.)"""

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = impl(*inputs)
            setup(ctx, inputs, output)
            return output

    Fn.backward = staticmethod(backward)
    return Fn


_LayerNormFn = _eager_function(_layer_norm, _layer_norm_setup,
                               _layer_norm_grads(_layer_norm_backward))
_FlashFn = _eager_function(_flash_attn, _flash_setup, _flash_grads(_packing_backward))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
               flavour: str = NATIVE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``gptlab::layer_norm``: LayerNorm over the last dim of x (..., C); returns (y, mean,
    rstd) with y = (x - mean) * rstd * weight + bias (biased variance, rstd = 1 / sqrt(var +
    eps)), y in x's dtype (contiguous), mean and rstd (...) float32 and not differentiable.
    bias may be None."""
    if _no_grad_needed(x, weight, bias):
        return _layer_norm(x, weight, bias, eps, flavour)
    if _eager(x, weight, bias):
        return _LayerNormFn.apply(x, weight, bias, eps, flavour)
    return layer_norm_op(x, weight, bias, eps, flavour)


# ------------------------------------------------------------------------ cross-entropy
def _cross_entropy_forward(logits: torch.Tensor, targets: torch.Tensor, need_grad: bool,
                           flavour: str = NATIVE) -> tuple[torch.Tensor, torch.Tensor]:
    name = "cross_entropy"
    lib, stream = _rowwise_library(flavour, name, (logits,), ("logits",))
    if logits.dim() != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
        raise KernelError(f"{name}: logits must be (N, V) with N, V >= 1, got "
                          f"{tuple(logits.shape)}")
    N, V = logits.shape
    _expect_shape(name, "targets", targets, (N,))
    if targets.dtype != torch.int64 or targets.device != logits.device:
        raise KernelError(f"{name}: targets must be int64 on {logits.device}, got "
                          f"{_dtype_name(targets.dtype)} on {targets.device}")
    if targets.device.type == "cpu":  # cheap here; on a GPU the kernel makes such rows NaN
        lo, hi = (int(t) for t in torch.aminmax(targets))
        if lo < 0 or hi >= V:
            raise KernelError(f"{name}: targets must be in [0, {V}), got values in "
                              f"[{lo}, {hi}]")
    lf, tc = _f32(logits), targets.contiguous()
    loss = lf.new_empty(())
    losses = lf.new_empty(N)
    dlogits = lf.new_empty((N, V) if need_grad else (0,))
    lib.call("gptlab_cross_entropy_forward_f32", lib.ptr(loss), lib.ptr(losses),
             lib.ptr(dlogits if need_grad else None), lib.ptr(lf),
             lib.ptr(tc, "int64_t *"), N, V, stream, _threads(16 * lf.numel()))
    return _like(loss, logits.dtype), dlogits


def _cross_entropy_backward(dlogits: torch.Tensor, dloss: torch.Tensor,
                            flavour: str = NATIVE) -> torch.Tensor:
    name = "cross_entropy_backward"
    lib, stream = _rowwise_library(flavour, name, (dlogits, dloss), ("dlogits", "dloss"))
    if dlogits.dim() != 2 or dlogits.dtype != torch.float32 or dlogits.numel() == 0:
        raise KernelError(f"{name}: dlogits must be a non-empty (N, V) float32 tensor, got "
                          f"{tuple(dlogits.shape)} {_dtype_name(dlogits.dtype)}")
    if dloss.numel() != 1:
        raise KernelError(f"{name}: dloss is {tuple(dloss.shape)}, expected ()")
    dlf, g = dlogits.contiguous(), _f32(dloss)
    dx = torch.empty_like(dlf)
    lib.call("gptlab_cross_entropy_backward_f32", lib.ptr(dx), lib.ptr(dlf), lib.ptr(g),
             dlf.shape[0], dlf.shape[1], stream, _threads(dlf.numel()))
    return dx


cross_entropy_forward = torch.library.custom_op(
    "gptlab::cross_entropy_forward", _cross_entropy_forward, mutates_args=())
cross_entropy_backward = torch.library.custom_op(
    "gptlab::cross_entropy_backward", _cross_entropy_backward, mutates_args=())


@cross_entropy_forward.register_fake
def _(logits, targets, need_grad, flavour=NATIVE):
    shape = tuple(logits.shape) if need_grad else (0,)
    return logits.new_empty(()), logits.new_empty(shape, dtype=torch.float32)


@cross_entropy_backward.register_fake
def _(dlogits, dloss, flavour=NATIVE):
    return dlogits.new_empty(dlogits.shape)


def _cross_entropy_setup(ctx, inputs, output):
    logits, _, ctx.need_grad, ctx.flavour = inputs
    ctx.dtype = logits.dtype
    _, dlogits = output
    ctx.mark_non_differentiable(dlogits)
    ctx.set_materialize_grads(False)  # no zero tensor made for d(dlogits)
    ctx.save_for_backward(dlogits)


def _cross_entropy_grads(backward_fn, *, reuse_for_unit_grad=False):
    def grads(ctx, dloss, _ddlogits):
        if dloss is None:
            return None, None, None, None
        if not ctx.need_grad:
            raise KernelError("cross_entropy_forward ran with need_grad=False: it kept no "
                              "gradient; call gptlab::cross_entropy, which asks for one when "
                              "the logits need it")
        (dlogits,) = ctx.saved_tensors
        if (reuse_for_unit_grad and ctx.dtype == torch.float32 and dloss.device.type == "cpu"
                and float(dloss) == 1.0):
            # loss.backward(): the saved gradient is the answer, no copy (reading a CPU scalar
            # costs no sync; an in-place change of it later trips autograd's version check)
            return dlogits, None, None, None
        return _like(backward_fn(dlogits, dloss, ctx.flavour), ctx.dtype), None, None, None
    return grads


cross_entropy_forward.register_autograd(_cross_entropy_grads(cross_entropy_backward),
                                        setup_context=_cross_entropy_setup)


_CrossEntropyFn = _eager_function(
    _cross_entropy_forward, _cross_entropy_setup,
    _cross_entropy_grads(_cross_entropy_backward, reuse_for_unit_grad=True))


# The registered op is composite (it runs where autograd is visible), so that it can ask the
# kernel for dlogits only when the logits need a gradient: the gradient is then computed in the
# forward pass and kept instead of the probabilities, and the backward only scales it.
torch.library.define("gptlab::cross_entropy",
                     "(Tensor logits, Tensor targets, str flavour='native') -> Tensor")


@torch.library.impl("gptlab::cross_entropy", "CompositeImplicitAutograd")
def _cross_entropy_composite(logits, targets, flavour=NATIVE):
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    return cross_entropy_forward(logits, targets, need_grad, flavour)[0]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                  flavour: str = NATIVE) -> torch.Tensor:
    """``gptlab::cross_entropy``: the mean softmax cross-entropy of logits (N, V) against
    targets (N,) int64, F.cross_entropy(logits, targets) (no ignore_index: every target must be
    in [0, V)); a 0-dim loss in logits' dtype. With a gradient wanted, it is computed in the
    same pass as the loss and kept (the backward only scales it)."""
    if _eager(logits, targets):
        need_grad = torch.is_grad_enabled() and logits.requires_grad
        if not need_grad:
            return _cross_entropy_forward(logits, targets, False, flavour)[0]
        return _CrossEntropyFn.apply(logits, targets, True, flavour)[0]
    return torch.ops.gptlab.cross_entropy(logits, targets, flavour)


# ------------------------------------------------------------------------ bias + GELU
def _bias_gelu(x: torch.Tensor, bias: torch.Tensor, flavour: str = NATIVE) -> torch.Tensor:
    name = "bias_gelu"
    lib, stream = _rowwise_library(flavour, name, (x, bias), ("x", "bias"))
    F_ = _last_dim(name, "x", x, "F")
    _expect_shape(name, "bias", bias, (F_,))
    xf, bf = _f32(x), _f32(bias)
    y = torch.empty_like(xf)
    rows = xf.numel() // F_
    if rows:
        lib.call("gptlab_bias_gelu_forward_f32", lib.ptr(y), lib.ptr(xf), lib.ptr(bf), rows, F_,
                 stream, _threads(32 * xf.numel()))
    return _like(y, torch.promote_types(x.dtype, bias.dtype))


def _bias_gelu_backward(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor,
                        flavour: str = NATIVE) -> tuple[torch.Tensor, torch.Tensor]:
    name = "bias_gelu_backward"
    lib, stream = _rowwise_library(flavour, name, (dy, x, bias), ("dy", "x", "bias"))
    F_ = _last_dim(name, "x", x, "F")
    _expect_shape(name, "dy", dy, x.shape)
    _expect_shape(name, "bias", bias, (F_,))
    xf, dyf, bf = _f32(x), _f32(dy), _f32(bias)
    dx = torch.empty_like(xf)
    db = xf.new_empty(F_)
    rows = xf.numel() // F_
    if rows:
        ws = _workspace(lib, xf, "gptlab_bias_gelu_backward_workspace_size", rows, F_)
        lib.call("gptlab_bias_gelu_backward_f32", lib.ptr(dx), lib.ptr(db),
                 lib.ptr(ws, "void *"), lib.ptr(dyf), lib.ptr(xf), lib.ptr(bf), rows, F_,
                 stream, _threads(48 * xf.numel()))
    else:
        db.zero_()
    return _like(dx, x.dtype), _like(db, bias.dtype)


bias_gelu_op = torch.library.custom_op("gptlab::bias_gelu", _bias_gelu, mutates_args=())
bias_gelu_backward = torch.library.custom_op("gptlab::bias_gelu_backward", _bias_gelu_backward,
                                             mutates_args=())


@bias_gelu_op.register_fake
def _(x, bias, flavour=NATIVE):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, bias.dtype))


@bias_gelu_backward.register_fake
def _(dy, x, bias, flavour=NATIVE):
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


def _bias_gelu_setup(ctx, inputs, output):
    x, bias, ctx.flavour = inputs
    ctx.save_for_backward(x, bias)  # u = x + bias is recomputed, never stored


def _bias_gelu_grads(backward_fn):
    def grads(ctx, dy):
        x, bias = ctx.saved_tensors
        dx, dbias = backward_fn(dy, x, bias, ctx.flavour)
        return dx, dbias, None
    return grads


bias_gelu_op.register_autograd(_bias_gelu_grads(bias_gelu_backward),
                               setup_context=_bias_gelu_setup)


_BiasGeluFn = _eager_function(_bias_gelu, _bias_gelu_setup,
                              _bias_gelu_grads(_bias_gelu_backward))


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, flavour: str = NATIVE) -> torch.Tensor:
    """``gptlab::bias_gelu``: gelu(x + bias) (exact erf GELU, F.gelu's default) for x (..., F),
    bias (F,); contiguous, in the dtype of x + bias. The backward recomputes x + bias from the
    saved x (nothing else of x's size is kept)."""
    if _no_grad_needed(x, bias):
        return _bias_gelu(x, bias, flavour)
    if _eager(x, bias):
        return _BiasGeluFn.apply(x, bias, flavour)
    return bias_gelu_op(x, bias, flavour)
