"""Torch operators over the native kernels: ``gptlab::fused_softmax`` and ``gptlab::flash_attn``.

Registered with ``torch.library.custom_op`` (with fake implementations and autograd formulas), so
they work in eager mode, under autograd and through ``torch.compile``. The last argument,
``kernels``, picks the library: ``"native"`` runs the kernels of the tensors' device (the C
library for CPU tensors, the nvcc library for CUDA tensors, on torch's current stream);
``"cuda-emu"`` runs the CUDA kernels on CPU tensors through the emulator. Inputs are checked here
(device, dtype, shapes) so that errors are readable before any pointer reaches C.
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


def _library(kernels: str, name: str, *tensors: torch.Tensor) -> tuple[NativeLibrary, object]:
    """Check the tensors; return the library to call and the stream argument."""
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise KernelError(f"{name}: tensors on different devices ({device} and {t.device})")
        if t.dtype != torch.float32:
            raise KernelError(f"{name}: float32 required, got {t.dtype}")
    flavour = get_flavour(native_flavour(device.type) if kernels == NATIVE else kernels)
    if flavour.device != device.type:
        raise KernelError(f"{name}: the {flavour.name} kernels take {flavour.device} tensors, "
                          f"got {device}")
    lib = load(flavour)
    if flavour.device == "cuda":
        return lib, lib.ffi.cast("void *", torch.cuda.current_stream(device).cuda_stream)
    return lib, lib.ffi.NULL


# ------------------------------------------------------------------------ fused softmax
@torch.library.custom_op("gptlab::fused_softmax", mutates_args=())
def fused_softmax(x: torch.Tensor, scale: float, causal: bool,
                  kernels: str = NATIVE) -> torch.Tensor:
    """softmax(scale * x + causal mask) over the last dim of (..., tq, tk)."""
    lib, stream = _library(kernels, "fused_softmax", x)
    x = x.contiguous()
    tq, tk = x.shape[-2], x.shape[-1]
    y = torch.empty_like(x)
    lib.call("gptlab_softmax_forward_f32", lib.ptr(y), lib.ptr(x), x.numel() // (tq * tk), tq,
             tk, scale, int(causal), stream, _threads(8 * x.numel()))
    return y


@fused_softmax.register_fake
def _(x, scale, causal, kernels=NATIVE):
    return torch.empty_like(x)


@torch.library.custom_op("gptlab::fused_softmax_backward", mutates_args=())
def fused_softmax_backward(y: torch.Tensor, dy: torch.Tensor, scale: float, causal: bool,
                           kernels: str = NATIVE) -> torch.Tensor:
    lib, stream = _library(kernels, "fused_softmax_backward", y, dy)
    y, dy = y.contiguous(), dy.contiguous()
    tq, tk = y.shape[-2], y.shape[-1]
    dx = torch.empty_like(y)
    lib.call("gptlab_softmax_backward_f32", lib.ptr(dx), lib.ptr(y), lib.ptr(dy),
             y.numel() // (tq * tk), tq, tk, scale, int(causal), stream,
             _threads(4 * y.numel()))
    return dx


@fused_softmax_backward.register_fake
def _(y, dy, scale, causal, kernels=NATIVE):
    return torch.empty_like(y)


def _softmax_setup(ctx, inputs, output):
    _, ctx.scale, ctx.causal, ctx.kernels = inputs
    ctx.save_for_backward(output)


def _softmax_backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return fused_softmax_backward(y, dy, ctx.scale, ctx.causal, ctx.kernels), None, None, None


fused_softmax.register_autograd(_softmax_backward, setup_context=_softmax_setup)


# ------------------------------------------------------------------------ flash attention
def _flatten(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-2], t.shape[-1]).contiguous()  # (B*nh, T, hs)


@torch.library.custom_op("gptlab::flash_attn", mutates_args=())
def flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
               kernels: str = NATIVE) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (o, lse): o like q, lse (..., tq) in natural log."""
    lib, stream = _library(kernels, "flash_attn", q, k, v)
    qf, kf, vf = _flatten(q), _flatten(k), _flatten(v)
    bh, tq, d = qf.shape
    tk = kf.shape[1]
    o = torch.empty_like(qf)
    lse = qf.new_empty(bh, tq)
    lib.call("gptlab_flash_forward_f32", lib.ptr(o), lib.ptr(lse), lib.ptr(qf), lib.ptr(kf),
             lib.ptr(vf), bh, tq, tk, d, scale, int(causal), stream,
             _threads(2 * bh * tq * tk * d))
    return o.view(q.shape), lse.view(q.shape[:-1])


@flash_attn.register_fake
def _(q, k, v, scale, causal, kernels=NATIVE):
    return torch.empty_like(q), q.new_empty(q.shape[:-1])


@torch.library.custom_op("gptlab::flash_attn_backward", mutates_args=())
def flash_attn_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        o: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool,
                        kernels: str = NATIVE
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lib, stream = _library(kernels, "flash_attn_backward", do, q, k, v, o, lse)
    qf, kf, vf, of, dof = (_flatten(t) for t in (q, k, v, o, do))
    lsef = lse.reshape(-1, qf.shape[1]).contiguous()
    bh, tq, d = qf.shape
    tk = kf.shape[1]
    dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(vf)
    ws_bytes = lib.lib.gptlab_flash_backward_workspace_size(bh, tq, tk, d)
    ws = qf.new_empty(max(1, -(-ws_bytes // 4)))  # allocated by torch, on the tensors' device
    lib.call("gptlab_flash_backward_f32", lib.ptr(dq), lib.ptr(dk), lib.ptr(dv),
             lib.ptr(ws, "void *"), lib.ptr(qf), lib.ptr(kf), lib.ptr(vf), lib.ptr(of),
             lib.ptr(lsef), lib.ptr(dof), bh, tq, tk, d, scale, int(causal), stream,
             _threads(5 * bh * tq * tk * d))
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


@flash_attn_backward.register_fake
def _(do, q, k, v, o, lse, scale, causal, kernels=NATIVE):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


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
