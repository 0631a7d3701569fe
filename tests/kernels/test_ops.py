"""torch.library.opcheck on every custom op (schema, autograd registration, fake tensors against
the real op's shapes and strides, AOT dispatch), for the C kernels in float32 and bfloat16 and
the emulated CUDA kernels; and multi-head attention traced whole (fullgraph, AOT autograd on fake
tensors) with the flash and fused backends."""

import pytest
import torch

from gptlab.plugins.cuda_kernels import ops

FLAVOURS = [("native", torch.float32), ("native", torch.bfloat16), ("cuda-emu", torch.float32)]


def qkv_views(dtype, tq=9, tk=9):
    """q, k, v as the model makes them: permuted views out of one (B, T, 3, nh, hs) tensor."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, tk, 3, 3, 8, generator=g).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (2, 3, tk, 8), not contiguous
    return q[..., tk - tq:, :], k, v


@pytest.mark.parametrize("flavour, dtype", FLAVOURS, ids=lambda x: str(x).replace("torch.", ""))
def test_opcheck_flash(flavour, dtype):
    q, k, v = qkv_views(dtype)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 0.3, True, flavour)
    torch.library.opcheck(ops.flash_attn, args)
    o, lse = ops.flash_attn(*args)
    do = torch.randn_like(o)
    torch.library.opcheck(ops.flash_attn_backward,
                          (do, q.detach(), k.detach(), v.detach(), o.detach(), lse, 0.3, True,
                           flavour))
    q2, k2, v2 = qkv_views(dtype, tq=3)  # fewer queries than keys
    torch.library.opcheck(ops.flash_attn, (q2, k2, v2, 0.5, True, flavour))


def odd_rank_views(dtype, shape, seed=0):
    """q, k, v of ``shape`` (..., T, d), each a non-contiguous view: the last two dims of a
    larger tensor transposed back, so no rank goes in contiguous."""
    g = torch.Generator().manual_seed(seed)
    *lead, T, d = shape
    return [torch.randn(*lead, d, T, generator=g).to(dtype).transpose(-1, -2)
            for _ in range(3)]


#: 3-D (heads flattened into the batch), 2-D, 5-D: the ranks other than (B, nh, T, d).
OTHER_RANKS = [(3, 9, 8), (9, 8), (2, 2, 2, 9, 8)]


@pytest.mark.parametrize("flavour, dtype", FLAVOURS, ids=lambda x: str(x).replace("torch.", ""))
def test_the_fakes_give_the_real_strides_for_any_rank(flavour, dtype):
    """For q of shape (6, 10, 64) the real op returned strides (64, 384, 1) and the fake
    (640, 64, 1); torch.compile trusts the fake. Each output of the forward and backward ops,
    real and fake, on 2-, 3- and 5-D inputs (and the 4-D ones)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for shape in [(6, 10, 64), *OTHER_RANKS, (2, 3, 9, 8)]:
        q, k, v = odd_rank_views(dtype, shape)
        o, lse = ops.flash_attn(q, k, v, 0.3, True, flavour)
        real = [o, lse, *ops.flash_attn_backward(torch.randn_like(o), q, k, v, o, lse, 0.3, True,
                                                 flavour)]
        mode = FakeTensorMode()
        fq, fk, fv, fo, flse = (mode.from_tensor(t) for t in (q, k, v, o, lse))
        with mode:
            fake = [*ops.flash_attn(fq, fk, fv, 0.3, True, flavour),
                    *ops.flash_attn_backward(torch.empty_like(fo), fq, fk, fv, fo, flse, 0.3,
                                             True, flavour)]
        for what, r, f in zip(("o", "lse", "dq", "dk", "dv"), real, fake):
            assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype), (shape, what)


@pytest.mark.parametrize("flavour, dtype", FLAVOURS, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("shape", OTHER_RANKS, ids=lambda s: f"{len(s)}d")
def test_opcheck_flash_on_other_ranks_and_non_contiguous_inputs(flavour, dtype, shape):
    q, k, v = (t.requires_grad_() for t in odd_rank_views(dtype, shape))
    torch.library.opcheck(ops.flash_attn, (q, k, v, 0.3, True, flavour))
    o, lse = ops.flash_attn(q, k, v, 0.3, True, flavour)
    torch.library.opcheck(ops.flash_attn_backward,
                          (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o.detach(),
                           lse, 0.3, True, flavour))


def test_opcheck_flash_tc_on_3d_inputs():
    """The tensor-core ops (emulated) on 3-D bfloat16 q, k, v: heads flattened into the batch."""
    q, k, v = (t.requires_grad_() for t in odd_rank_views(torch.bfloat16, (3, 9, 64)))
    torch.library.opcheck(ops.flash_attn_tc, (q, k, v, 0.125, True, "cuda-emu"))
    o, lse = ops.flash_attn_tc(q, k, v, 0.125, True, "cuda-emu")
    assert o.stride() == (64, 3 * 64, 1)  # heads last, as for 4-D
    torch.library.opcheck(ops.flash_attn_tc_backward,
                          (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o.detach(),
                           lse, 0.125, True, "cuda-emu"))


@pytest.mark.parametrize("flavour, dtype", FLAVOURS, ids=lambda x: str(x).replace("torch.", ""))
def test_opcheck_fused_softmax(flavour, dtype):
    x = torch.randn(2, 3, 7, 7).to(dtype).transpose(-1, -2).requires_grad_()  # not contiguous
    torch.library.opcheck(ops.fused_softmax, (x, 0.7, True, flavour))
    y = ops.fused_softmax(x, 0.7, True, flavour)
    torch.library.opcheck(ops.fused_softmax_backward,
                          (y.detach(), torch.randn_like(y), 0.7, True, flavour))


@pytest.mark.parametrize("name", ["flash", "fused"])
def test_the_fakes_match_the_real_ops_under_torch_compile(registry, name):
    """Before: the fake returned the input's strides, the real op a contiguous tensor
    (`AssertionError expected size 4==4, stride 1024==16 at dim=1` under torch.compile)."""
    from gptlab.nn import MultiHeadAttention
    from gptlab.core.config import ModelConfig

    torch.manual_seed(0)
    mha = MultiHeadAttention(ModelConfig(n_head=4, n_embd=32), registry.attention_backend(name)())
    x = torch.randn(2, 16, 32)
    eager = mha(x)
    compiled = torch.compile(mha, backend="aot_eager", fullgraph=True)(x)
    assert torch.allclose(eager, compiled, atol=1e-6)
    compiled.sum().backward()
    assert all(p.grad is not None for p in mha.parameters())


# ------------------------------------------------------------------------ row-wise ops
@pytest.mark.parametrize("flavour, dtype", FLAVOURS, ids=lambda x: str(x).replace("torch.", ""))
def test_opcheck_layer_norm(flavour, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 7, generator=g).to(dtype).transpose(0, 1).requires_grad_()  # strided
    w, b = (torch.randn(7, generator=g).requires_grad_() for _ in range(2))  # float32 params
    for bias in (b, None):
        torch.library.opcheck(ops.layer_norm_op, (x, w, bias, 1e-5, flavour))
    y, mean, rstd = ops.layer_norm_op(x, w, b, 1e-5, flavour)
    for has_bias in (True, False):
        torch.library.opcheck(ops.layer_norm_backward,
                              (torch.randn_like(y), x.detach(), w.detach(), mean, rstd, has_bias,
                               flavour))


@pytest.mark.parametrize("flavour, dtype", FLAVOURS, ids=lambda x: str(x).replace("torch.", ""))
def test_opcheck_cross_entropy(flavour, dtype):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 13, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, 13, (9,), generator=g)
    torch.library.opcheck(torch.ops.gptlab.cross_entropy.default, (logits, targets, flavour))
    torch.library.opcheck(ops.cross_entropy_forward, (logits, targets, True, flavour))
    # need_grad=False keeps no gradient (its backward refuses): for logits that need none
    torch.library.opcheck(ops.cross_entropy_forward, (logits.detach(), targets, False, flavour))
    _, dlogits = ops.cross_entropy_forward(logits.detach(), targets, True, flavour)
    torch.library.opcheck(ops.cross_entropy_backward, (dlogits, torch.tensor(0.7), flavour))


@pytest.mark.parametrize("flavour, dtype", FLAVOURS, ids=lambda x: str(x).replace("torch.", ""))
def test_opcheck_bias_gelu(flavour, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 11, generator=g).to(dtype).transpose(0, 1).requires_grad_()
    b = torch.randn(11, generator=g).to(dtype).requires_grad_()
    torch.library.opcheck(ops.bias_gelu_op, (x, b, flavour))
    torch.library.opcheck(ops.bias_gelu_backward,
                          (torch.randn(3, 4, 11).to(dtype), x.detach(), b.detach(), flavour))


def test_opcheck_flash_tc():
    """The tensor-core op and its backward (emulated; bfloat16 views of one projection, as the
    model makes them, and fewer queries than keys)."""
    qkv = torch.randn(2, 9, 3, 2, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (2, 2, 9, 64), heads strided
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 0.125, True, "cuda-emu")
    torch.library.opcheck(ops.flash_attn_tc, args)
    o, lse = ops.flash_attn_tc(*args)
    torch.library.opcheck(ops.flash_attn_tc_backward,
                          (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o.detach(),
                           lse, 0.125, True, "cuda-emu"))
    torch.library.opcheck(ops.flash_attn_tc, (q[..., 6:, :], k, v, 0.125, True, "cuda-emu"))
