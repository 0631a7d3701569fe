"""The C kernels (csrc/cpu/) through their ops and backends: memory behaviour, masked rows,
typed errors, training, torch.compile."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptlab.core.errors import BackendNotSupportedError
from gptlab.plugins.cuda_kernels import loader, ops
from gptlab.plugins.cuda_kernels.backends import FlashAttention, FusedAttention
from gptlab.plugins.cuda_kernels.loader import KernelError
from gptlab.testing import reference_attention


def test_flash_backward_saves_no_t_by_t_tensor():
    T, D = 256, 16
    q, k, v = (torch.randn(2, 2, T, D, requires_grad=True) for _ in range(3))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = FlashAttention()(q, k, v, causal=True)
    out.sum().backward()
    assert saved and max(saved) <= 2 * 2 * T * D < T * T
    # the fused backend, by contrast, keeps the (T, T) probabilities
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        FusedAttention()(q, k, v, causal=True)
    assert max(saved) >= T * T


def test_fully_masked_rows_are_zero_not_nan():
    lib = loader.load("cpu")
    # 3 queries, 2 keys, causal bottom-right: query 0 sees no key
    q, k, v = torch.randn(1, 3, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    o, lse = torch.empty(1, 3, 8), torch.empty(1, 3)
    strides = lib.ffi.new("int64_t[]", [0, 24, 8, 0, 16, 8, 0, 16, 8, 0, 24, 8])  # q, k, v, o
    lib.call("gptlab_flash_forward_f32", lib.ptr(o), lib.ptr(lse), lib.ptr(q), lib.ptr(k),
             lib.ptr(v), strides, 1, 1, 3, 2, 8, 0.35, 1, lib.ffi.NULL, 1)
    assert torch.isfinite(o).all() and o[0, 0].abs().max() == 0 and lse[0, 0] == math.inf
    x = torch.full((1, 2, 4), -math.inf)
    y = ops.fused_softmax(x, 1.0, False)
    assert torch.equal(y, torch.zeros_like(y))


def test_fused_softmax_matches_torch_and_gradcheck_like():
    x = torch.randn(3, 33, 70, requires_grad=True)
    y = ops.fused_softmax(x, 0.7, True)
    keep = torch.ones(33, 70, dtype=torch.bool).tril(70 - 33)
    x64 = x.detach().double().requires_grad_()
    ref = torch.softmax((x64 * 0.7).masked_fill(~keep, -math.inf), -1)
    assert torch.allclose(y.double(), ref, atol=1e-6)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (rx,) = torch.autograd.grad(ref, x64, g.double())
    assert torch.allclose(gx.double(), rx, atol=1e-5)


def test_bad_inputs_are_typed_errors():
    with pytest.raises(KernelError, match="cpu kernels take float32 or bfloat16, got float64"):
        ops.flash_attn(*(torch.randn(1, 1, 4, 8, dtype=torch.float64) for _ in range(3)), 1.0,
                       True)
    lib = loader.load("cpu")
    with pytest.raises(KernelError, match=r"gptlab_flash_forward_f32 failed \(code 1\).*sizes"):
        lib.call("gptlab_flash_forward_f32", *([lib.ffi.cast("float *", 8)] * 5),
                 lib.ffi.new("int64_t[]", 12), 1, 1, 0, 4, 8, 1.0, 1, lib.ffi.NULL, 1)
    with pytest.raises(KernelError, match="head dim 300 > 256"):
        ops.flash_attn(*(torch.randn(1, 1, 4, 300) for _ in range(3)), 1.0, True)
    with pytest.raises(BackendNotSupportedError, match=r"flash: attention dropout \(p=0.1\)"):
        FlashAttention()(*(torch.randn(1, 1, 4, 8) for _ in range(3)), dropout_p=0.1)
    with pytest.raises(KernelError, match="dropout"):  # the kernel's own check, if called raw
        FlashAttention().forward(*(torch.randn(1, 1, 4, 8) for _ in range(3)), dropout_p=0.1)


def test_flash_trains_like_naive(registry):
    """Same seed, same data: flash and naive give the same losses (they compute the same)."""
    from gptlab.core.config import ModelConfig, TrainConfig
    from gptlab.core.trainer import train

    text = "It was in July, 1805, and the speaker was the well-known Anna Pavlovna. " * 30
    losses = {}
    for name in ("naive", "flash", "fused"):
        mc = ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, attention=name)
        tc = TrainConfig(max_iters=40, batch_size=8, eval_interval=20, eval_iters=4,
                         final_eval_iters=4, seed=3)
        losses[name] = train(registry, mc, tc, text).val_loss
    assert abs(losses["flash"] - losses["naive"]) < 1e-3
    assert abs(losses["fused"] - losses["naive"]) < 1e-3


def test_flash_works_under_torch_compile():
    flash = FlashAttention()
    f = torch.compile(lambda q, k, v: flash(q, k, v).sum(), backend="eager", fullgraph=True)
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    f(q, k, v).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_flash_lse_is_an_auxiliary_output_without_gradient():
    """The backward has no d(lse) term, so lse must not pretend to be differentiable."""
    q = torch.randn(1, 2, 8, 8, requires_grad=True)
    o, lse = ops.flash_attn(q, q, q, 0.3, True)
    assert o.requires_grad and not lse.requires_grad


@pytest.mark.parametrize("flavour", ["native", "cuda-emu"])
def test_flash_reads_strided_views_and_writes_heads_last(flavour):
    """q, k, v as split views of a qkv projection go in with no copy; o and the gradients come
    out laid out (B, T, nh, hs), so concatenating heads is a view; values match float64."""
    B, T, nh, hs = 2, 37, 3, 16
    C = nh * hs
    qkv = torch.randn(B, T, 3 * C, dtype=torch.float64)
    views = [t.view(B, T, nh, hs).transpose(1, 2) for t in qkv.float().split(C, dim=2)]
    q, k, v = (t.requires_grad_() for t in views)
    assert not q.is_contiguous() and q.stride() == (T * 3 * C, hs, 3 * C, 1)
    o, _ = ops.flash_attn(q, k, v, hs ** -0.5, True, flavour)
    y = o.transpose(1, 2).reshape(B, T, C)
    assert y.data_ptr() == o.data_ptr() and y.is_contiguous()  # a view, not a copy
    ref = [t.view(B, T, nh, hs).transpose(1, 2).requires_grad_() for t in qkv.split(C, dim=2)]
    want = reference_attention(*ref, causal=True)
    assert (o.double() - want).abs().max() < 1e-5
    g = torch.randn(B, nh, T, hs, dtype=torch.float64)
    grads = torch.autograd.grad(o, (q, k, v), g.float())
    want_grads = torch.autograd.grad(want, ref, g)
    for got, exp in zip(grads, want_grads):
        assert got.transpose(1, 2).is_contiguous()  # heads last: (B, T, nh, hs) in memory
        assert (got.double() - exp).abs().max() < 1e-4


def test_flash_ab_benchmark_compares_builds_of_the_kernel():
    """benchmarks/flash_ab.py builds the kernel of git revisions and of the working tree (".")
    and times them side by side; two builds of the same sources agree to the bit."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "flash_ab.py"
    out = subprocess.run([sys.executable, str(script), "HEAD", "HEAD", ".", "--rounds", "2",
                          "--shape", "1,2,16,8", "--no-evict"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    *_, header, first, second, tree = out.strip().splitlines()
    assert header.split()[0] == "revision", out
    assert [first.split()[0], second.split()[0], tree.split()[0]] == ["HEAD", "HEAD", "."]
    assert second.split()[-1] == "0.0e+00", out  # the same kernel: the same outputs
    assert all(float(x) > 0 for x in tree.split()[1:5]), out  # times and ratios
