"""Torch operators over the native kernels: ``gptlab::fused_softmax`` and ``gptlab::flash_attn``.

Registered with ``torch.library.custom_op`` (with fake implementations and autograd formulas), so
they work in eager mode, under autograd and through ``torch.compile``. The last argument,
``kernels``, picks the library: ``"native"`` runs the kernels of the tensors' device (the C
library for CPU tensors, the nvcc library for CUDA tensors, on torch's current stream);
``"cuda-emu"`` runs the CUDA kernels on CPU tensors through the emulator. Inputs are checked here
(device, dtype, shapes) so that errors are readable before any pointer reaches C.

Dtypes: the kernels compute in float32. On the CPU, bfloat16 inputs (what ``torch.autocast``
gives the attention under ``--dtype bfloat16``) are widened to float32 for the kernel and the
outputs rounded back to bfloat16; the logsumexp stays float32. The fake implementations return
exactly the shapes, dtypes and (contiguous) strides of the real ones, so ``torch.compile``
traces them.
"""

from __future__ import annotations

import torch

from gptlab.plugins.cuda_kernels.build import get_flavour
from gptlab.plugins.cuda_kernels.loader import KernelError, NativeLibrary, load

NATIVE = "native"

#: Below this many multiply-adds a CPU call runs on one thread: starting threads (and sharing
#: cores with torch's own still-spinning OpenMP workers) costs more than it saves.
MIN_WORK_PER_THREAD = 1 << 20


def _threads(work: int) -> int:
    return max(1, min(torch.get_num_threads(), work // MIN_WORK_PER_THREAD))


def native_flavour(device_type: str) -> str:
    """The kernel flavour that serves tensors of this device type with ``kernels="native"``."""
    if device_type not in ("cpu", "cuda"):
        raise KernelError(f"no native kernels for {device_type} tensors (cpu and cuda only)")
    return device_type


def _library(kernels: str, name: str, *tensors: torch.Tensor,
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
    flavour = get_flavour(native_flavour(device.type) if kernels == NATIVE else kernels)
    allowed = (torch.float32, torch.bfloat16) if flavour.name == "cpu" else (torch.float32,)
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
            raise KernelError(f"{name}: the {flavour.name} kernels take {names}, got "
                              f"{str(t.dtype).replace('torch.', '')}")
    if flavour.device != device.type:
        raise KernelError(f"{name}: the {flavour.name} kernels take {flavour.device} tensors, "
                          f"got {device}")
    lib = load(flavour)
    if flavour.device == "cuda":
        return lib, lib.ffi.cast("void *", torch.cuda.current_stream(device).cuda_stream)
    return lib, lib.ffi.NULL


def _f32(t: torch.Tensor) -> torch.Tensor:
    """A contiguous float32 view or copy of ``t`` (bfloat16 is widened: exact)."""
    return t.contiguous() if t.dtype == torch.float32 else t.float().contiguous()


def _like(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float32 result in the caller's dtype (bfloat16: rounded to nearest even)."""
    return out if out.dtype == dtype else out.to(dtype)


# ------------------------------------------------------------------------ fused softmax
@torch.library.custom_op("gptlab::fused_softmax", mutates_args=())
def fused_softmax(x: torch.Tensor, scale: float, causal: bool,
                  kernels: str = NATIVE) -> torch.Tensor:
    """softmax(scale * x + causal mask) over the last dim of (..., tq, tk)."""
    lib, stream = _library(kernels, "fused_softmax", x)
    if x.dim() < 2:
        raise KernelError(f"fused_softmax: x must be (..., tq, tk), got {tuple(x.shape)}")
    xf = _f32(x)
    tq, tk = x.shape[-2], x.shape[-1]
    y = torch.empty_like(xf)
    lib.call("gptlab_softmax_forward_f32", lib.ptr(y), lib.ptr(xf), xf.numel() // (tq * tk),
             tq, tk, scale, int(causal), stream, _threads(8 * xf.numel()))
    return _like(y, x.dtype)


@fused_softmax.register_fake
def _(x, scale, causal, kernels=NATIVE):
    return x.new_empty(x.shape)  # contiguous, like the real output


@torch.library.custom_op("gptlab::fused_softmax_backward", mutates_args=())
def fused_softmax_backward(y: torch.Tensor, dy: torch.Tensor, scale: float, causal: bool,
                           kernels: str = NATIVE) -> torch.Tensor:
    lib, stream = _library(kernels, "fused_softmax_backward", y, dy)
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
def _(y, dy, scale, causal, kernels=NATIVE):
    return dy.new_empty(y.shape)


def _softmax_setup(ctx, inputs, output):
    _, ctx.scale, ctx.causal, ctx.kernels = inputs
    ctx.save_for_backward(output)


def _softmax_backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return fused_softmax_backward(y, dy, ctx.scale, ctx.causal, ctx.kernels), None, None, None


fused_softmax.register_autograd(_softmax_backward, setup_context=_softmax_setup)


# ------------------------------------------------------------------------ flash attention
def _flatten(t: torch.Tensor) -> torch.Tensor:
    return _f32(t.reshape(-1, t.shape[-2], t.shape[-1]))  # (B*nh, T, hs) float32


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


@torch.library.custom_op("gptlab::flash_attn", mutates_args=())
def flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
               kernels: str = NATIVE) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (o, lse): o like q (contiguous), lse (..., tq) float32 in natural log."""
    lib, stream = _library(kernels, "flash_attn", q, k, v)
    _check_qkv("flash_attn", q, k, v)
    qf, kf, vf = _flatten(q), _flatten(k), _flatten(v)
    bh, tq, d = qf.shape
    tk = kf.shape[1]
    o = torch.empty_like(qf)
    lse = qf.new_empty(bh, tq)
    lib.call("gptlab_flash_forward_f32", lib.ptr(o), lib.ptr(lse), lib.ptr(qf), lib.ptr(kf),
             lib.ptr(vf), bh, tq, tk, d, scale, int(causal), stream,
             _threads(2 * bh * tq * tk * d))
    return _like(o.view(q.shape), q.dtype), lse.view(q.shape[:-1])


@flash_attn.register_fake
def _(q, k, v, scale, causal, kernels=NATIVE):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("gptlab::flash_attn_backward", mutates_args=())
def flash_attn_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        o: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool,
                        kernels: str = NATIVE
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lib, stream = _library(kernels, "flash_attn_backward", do, q, k, v, o, lse=lse)
    _check_qkv("flash_attn_backward", q, k, v, o=o, do=do, lse=lse)
    qf, kf, vf, of, dof = (_flatten(t) for t in (q, k, v, o, do))
    lsef = _f32(lse.reshape(-1, qf.shape[1]))
    bh, tq, d = qf.shape
    tk = kf.shape[1]
    dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(vf)
    ws_bytes = lib.lib.gptlab_flash_backward_workspace_size(bh, tq, tk, d)
    ws = qf.new_empty(max(1, -(-ws_bytes // 4)))  # allocated by torch, on the tensors' device
    lib.call("gptlab_flash_backward_f32", lib.ptr(dq), lib.ptr(dk), lib.ptr(dv),
             lib.ptr(ws, "void *"), lib.ptr(qf), lib.ptr(kf), lib.ptr(vf), lib.ptr(of),
             lib.ptr(lsef), lib.ptr(dof), bh, tq, tk, d, scale, int(causal), stream,
             _threads(5 * bh * tq * tk * d))
    return (_like(dq.view(q.shape), q.dtype), _like(dk.view(k.shape), k.dtype),
            _like(dv.view(v.shape), v.dtype))


@flash_attn_backward.register_fake
def _(do, q, k, v, o, lse, scale, causal, kernels=NATIVE):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_setup(ctx, inputs, output):
    q, k, v, ctx.scale, ctx.causal, ctx.kernels = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)  # an auxiliary output: the backward has no dlse term
    ctx.save_for_backward(q, k, v, o, lse)  # O(T * hs): no T x T tensor is kept


def _flash_backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = flash_attn_backward(do, q, k, v, o, lse, ctx.scale, ctx.causal, ctx.kernels)
    return dq, dk, dv, None, None, None


flash_attn.register_autograd(_flash_backward, setup_context=_flash_setup)
