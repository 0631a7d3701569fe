"""The tensor-core flash attention (csrc/cuda/flash_tc.cu) on the emulator: FlashAttention's
accuracy rule for the forward and the backward in bfloat16 and float16 under two schedules (and
fewer cases under greedy and reverse), head dims 64 and 128, odd lengths, causal or not, fewer
(and more) queries than keys, strided views; the race detector finds no race; a planted missing
cp.async wait fails; typed errors and honest backend capabilities."""

import math

import attrs
import pytest
import torch

from gptlab.core.attention import AttentionRequest
from gptlab.plugins.cuda_kernels import backends, build, ops
from gptlab.plugins.cuda_kernels.loader import KernelError
from gptlab.testing import reference_attention
from gptlab.verify import emulated, emulator

#: FlashAttention's rule (the tests of Dao et al.'s flash-attention): the kernel's max abs error
#: against a float64 reference is at most 2x that of plain PyTorch attention computed in the
#: same low-precision dtype, plus a slack of 1e-5 times the reference's largest entry (for cases
#: where torch's own error is near 0, e.g. one visible key).
FACTOR, SLACK = 2.0, 1e-5


def torch_attention(q, k, v, causal: bool) -> torch.Tensor:
    """softmax(QKᵀ·s + mask) V in plain torch ops in q's dtype (the rule's baseline); rows that
    see no key give 0 as in the kernels."""
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    if causal:
        tq, tk = q.size(-2), k.size(-2)
        keep = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0) @ v


def flavour_for(device: str) -> str:
    return "cuda-emu" if device == "cpu" else "native"


def errors(dtype, B, nh, tq, tk, d, causal, q_scale=1.0, seed=0, strided=False, device="cpu",
           flavour=None):
    """(kernel's max abs error, torch's, reference's max |entry|, lse's max error); the kernel
    runs on ``device`` (cpu: the emulator, or ``flavour``), torch and the reference on the
    CPU."""
    gen = torch.Generator().manual_seed(seed)
    if strided:  # views of a (B, T, 3, nh, d) projection, as the model passes them
        assert tq == tk
        qkv = torch.randn(B, tq, 3, nh, d, generator=gen).to(dtype)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q = torch.randn(B, nh, tq, d, generator=gen).to(dtype)
        k, v = (torch.randn(B, nh, tk, d, generator=gen).to(dtype) for _ in range(2))
    q = (q.float() * q_scale).to(dtype)
    o, lse = ops.flash_attn_tc(q.to(device), k.to(device), v.to(device), 1 / math.sqrt(d),
                               causal, flavour or flavour_for(device))
    o, lse = o.cpu(), lse.cpu()
    ref = reference_attention(q, k, v, causal)
    base = (torch_attention(q, k, v, causal).double() - ref).abs().max().item()
    err = (o.double() - ref).abs().max().item()
    s = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(d)
    if causal:
        s = s.masked_fill(~torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq), float("-inf"))
    ref_lse = torch.logsumexp(s, dim=-1).nan_to_num(neginf=math.inf)  # no key: +inf
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    lse_err = (lse.double() - ref_lse)[seen].abs().max().item() if seen.any() else 0.0
    return err, base, ref.abs().max().item(), lse_err


def check(dtype, *case, **kw):
    err, base, top, lse_err = errors(dtype, *case, **kw)
    assert err <= FACTOR * base + SLACK * top, \
        f"{dtype} {case} {kw}: error {err:.3e} > {FACTOR:g} x torch's {base:.3e} + slack"
    assert lse_err <= 1e-4 * (1 + abs(top)), f"{case}: lse error {lse_err:.2e}"
    return err, base


# (B, nh, tq, tk, d, causal): odd lengths, tq < tk (bottom-right causal), tq > tk (rows that see
# no key give 0), one tile and several, both head dims
CASES = [(1, 2, 1, 1, 64, True), (1, 2, 7, 7, 64, False), (2, 1, 65, 65, 64, True),
         (1, 1, 97, 97, 64, False), (1, 1, 255, 255, 64, True), (1, 1, 256, 256, 64, False),
         (1, 2, 7, 7, 128, True), (1, 1, 65, 65, 128, False), (1, 1, 97, 97, 128, True),
         (1, 1, 255, 255, 128, False), (1, 1, 256, 256, 128, True),
         (1, 2, 1, 65, 64, True), (1, 1, 7, 97, 128, True), (1, 1, 65, 200, 64, True),
         (1, 1, 65, 200, 128, False), (1, 1, 9, 4, 64, True), (1, 1, 9, 4, 128, False)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("schedule", emulator.ALL_SCHEDULES)
def test_tc_forward_within_2x_of_torch(schedule, dtype):
    with emulator.schedule(schedule):
        for case in CASES:
            check(dtype, *case)


def test_tc_forward_within_2x_of_torch_in_float16_strided_and_large_logits():
    with emulator.schedule("random:1"):
        for case in [(1, 2, 65, 65, 64, True), (1, 1, 97, 97, 128, False),
                     (1, 1, 7, 97, 64, True), (1, 1, 9, 4, 128, True)]:
            check(torch.float16, *case)
        check(torch.float16, 2, 3, 65, 65, 64, True, strided=True)
        check(torch.bfloat16, 1, 2, 97, 97, 128, False, strided=True)
        check(torch.bfloat16, 1, 1, 97, 97, 64, True, q_scale=20.0)  # peaked softmax


def test_rows_that_see_no_key_are_zero_with_infinite_lse():
    q = torch.randn(1, 1, 9, 64).bfloat16()
    k = v = torch.randn(1, 1, 4, 64).bfloat16()
    o, lse = ops.flash_attn_tc(q, k, v, 0.125, True, "cuda-emu")
    assert torch.equal(o[0, 0, :5], torch.zeros(5, 64, dtype=torch.bfloat16))
    assert torch.isinf(lse[0, 0, :5]).all() and torch.isfinite(lse[0, 0, 5:]).all()


@pytest.fixture
def planted():
    """flash_tc.cu built without the cp.async wait at the end of each key tile."""
    flavour = attrs.evolve(build.CUDA_EMU, name="cuda-emu-planted-wait",
                           flags=(*build.CUDA_EMU.flags, "-DGL_PLANT_MISSING_CP_ASYNC_WAIT"))
    build.FLAVOURS[flavour.name] = flavour
    yield flavour.name
    del build.FLAVOURS[flavour.name]


def test_planted_missing_cp_async_wait_reads_nan(planted):
    q = torch.randn(1, 1, 64, 64).bfloat16()
    k = v = torch.randn(1, 1, 130, 64).bfloat16()
    o, _ = ops.flash_attn_tc(q, k, v, 0.125, False, planted)
    assert torch.isnan(o).all()  # the second key tile was read before it landed
    o, _ = ops.flash_attn_tc(q, k, v, 0.125, False, "cuda-emu")
    assert torch.isfinite(o).all()


def test_tc_errors_and_capabilities():
    q = torch.randn(1, 1, 4, 80).bfloat16()
    with pytest.raises(KernelError, match="head dim 80 not supported"):
        ops.flash_attn_tc(q, q, q, 1.0, True, "cuda-emu")
    q = torch.randn(1, 1, 4, 64)
    with pytest.raises(KernelError, match="take bfloat16 or float16.*got float32"):
        ops.flash_attn_tc(q, q, q, 1.0, True, "cuda-emu")
    with pytest.raises(KernelError, match="tensor-core kernels are CUDA's"):
        ops.flash_attn_tc(q.bfloat16(), q.bfloat16(), q.bfloat16(), 1.0, True)
    lib = ops.load("cuda-emu")  # the C entry point checks too, before any launch
    with pytest.raises(KernelError, match="strides must be multiples of 8"):
        t = torch.zeros(1, 1, 4, 64, dtype=torch.bfloat16)
        lib.call("gptlab_flash_forward_bf16", lib.ptr(t, "void *"), lib.ptr(torch.zeros(4)),
                 lib.ptr(t, "void *"), lib.ptr(t, "void *"), lib.ptr(t, "void *"),
                 lib.ffi.new("int64_t[]", [256, 256, 63] * 4), 1, 1, 4, 4, 64, 1.0, 1,
                 lib.ffi.NULL, 1)
    tc, emu = backends.TensorCoreFlash, emulated.EmulatedTensorCoreFlash
    ok = AttentionRequest(device="cpu", dtype=torch.bfloat16, head_dim=128, q_len=7, k_len=97,
                          requires_grad=False)
    assert emu.not_supported_reasons(ok) == []
    assert "head_dim 96 not supported by the tensor-core kernels (64 or 128)" in \
        emu.not_supported_reasons(attrs.evolve(ok, head_dim=96))
    assert emu.not_supported_reasons(attrs.evolve(ok, requires_grad=True)) == []
    assert not tc.is_deterministic("cuda")  # dQ by atomics
    assert any("dtype float32 not supported" in r
               for r in tc.not_supported_reasons(attrs.evolve(ok, device="cuda",
                                                              dtype=torch.float32)))
    cuda = attrs.evolve(ok, device="cuda")
    assert tc.priority_for(cuda) < 50  # below sdpa until measured on a GPU
    out = emu()(*(torch.randn(1, 2, 7, 64).bfloat16() for _ in range(3)), causal=True)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 2, 7, 64)


def test_flash_names_the_algorithm_the_tensor_cores_serve_bf16_and_f16_on_cuda():
    """``flash`` in bfloat16 or float16 on CUDA runs flash_tc.cu (here: on the emulator, as
    ``flash-emu``); ``flash-tc`` stays a name for it that auto never takes."""
    flash, emu = backends.FlashAttention, emulated.EmulatedFlash
    req = AttentionRequest(device="cuda", dtype=torch.bfloat16, head_dim=64)
    assert flash.tensor_cores("cuda", torch.bfloat16) and flash.tensor_cores("cuda", torch.float16)
    assert not flash.tensor_cores("cuda", torch.float32)
    assert not flash.tensor_cores("cpu", torch.bfloat16)  # the C kernels, widened
    assert flash.priority_for(req) == flash.TENSOR_CORE_PRIORITY < 50
    assert flash.priority_for(attrs.evolve(req, dtype=torch.float32)) == flash.CUDA_PRIORITY
    assert any("by the tensor-core kernels (64 or 128)" in r
               for r in flash.not_supported_reasons(attrs.evolve(req, head_dim=80)))
    assert backends.TensorCoreFlash.alias_of == "flash"
    q, k, v = (torch.randn(1, 2, 33, 64, generator=torch.Generator().manual_seed(i)).bfloat16()
               for i in range(3))
    want, _ = ops.flash_attn_tc(q, k, v, 0.125, True, "cuda-emu")
    assert torch.equal(emu()(q, k, v, causal=True, scale=0.125), want)  # the same kernel
    assert emu.not_supported_reasons(AttentionRequest(device="cpu", dtype=torch.float16,
                                                      head_dim=128)) == []


def grad_errors(dtype, B, nh, tq, tk, d, causal, seed=0, device="cpu", flavour=None):
    """For o, dq, dk, dv: (kernel's max abs error, torch's in dtype, reference's max |entry|)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, tq, d, generator=gen).to(dtype)
    k, v = (torch.randn(B, nh, tk, d, generator=gen).to(dtype) for _ in range(2))
    do = torch.randn(B, nh, tq, d, generator=gen).to(dtype)

    def run(fn, dt, dev="cpu"):
        leaves = [t.to(dev, dt).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return [t.cpu() for t in (out, *torch.autograd.grad(out, leaves, do.to(dev, dt)))]

    ref = run(lambda *t: reference_attention(*t, causal), torch.float64)
    base = run(lambda *t: torch_attention(*t, causal), dtype)
    got = run(lambda *t: ops.flash_attn_tc(*t, 1 / math.sqrt(d), causal,
                                           flavour or flavour_for(device))[0], dtype, device)
    return [((g.double() - r).abs().max().item(), (b.double() - r).abs().max().item(),
             r.abs().max().item()) for g, b, r in zip(got, base, ref)]


BWD_CASES = [(1, 2, 7, 7, 64, True), (2, 1, 65, 65, 64, True), (1, 1, 97, 97, 128, False),
             (1, 1, 7, 97, 128, True), (1, 1, 65, 130, 64, False), (4, 4, 9, 4, 64, True),
             (1, 1, 200, 200, 128, True)]


@pytest.mark.parametrize("schedule", emulator.ALL_SCHEDULES)
def test_tc_backward_within_2x_of_torch(schedule):
    with emulator.schedule(schedule):
        for dtype in (torch.bfloat16, torch.float16):
            for case in BWD_CASES if dtype == torch.bfloat16 else BWD_CASES[1:4]:
                for name, (err, base, top) in zip(("o", "dq", "dk", "dv"),
                                                  grad_errors(dtype, *case)):
                    assert err <= FACTOR * base + SLACK * top, \
                        f"{dtype} {case} {name}: error {err:.3e} > 2 x torch's {base:.3e}"


def test_tc_within_2x_of_torch_with_a_gpus_numerics():
    """Forward and backward on flavour cuda-emu-numerics (mma summed pairwise, FMA contraction,
    exp2f off by up to 2 ulp, subnormals flushed by atomicAdd into dQ): the rule still holds."""
    numerics = build.CUDA_EMU_NUMERICS.name
    for dtype in (torch.bfloat16, torch.float16):
        for case in CASES:
            check(dtype, *case, flavour=numerics)
        for case in BWD_CASES if dtype == torch.bfloat16 else BWD_CASES[1:4]:
            for name, (err, base, top) in zip(("o", "dq", "dk", "dv"),
                                              grad_errors(dtype, *case, flavour=numerics)):
                assert err <= FACTOR * base + SLACK * top, \
                    f"{dtype} {case} {name}: error {err:.3e} > 2 x torch's {base:.3e}"


def test_racecheck_finds_no_race_in_flash_tc():
    """The race detector sees every shared access of these kernels (ldmatrix, cp.async, the dSᵀ
    and L, Dvec stores) and dQ's atomics: silent on the correct kernels, blocks interleaved,
    both head dims, several key and query tiles, causal or not."""
    from gptlab.testing import check_precision
    from gptlab.verify import mutations

    tc = mutations.emulated_backend(emulated.EmulatedTensorCoreFlash,
                                    build.CUDA_EMU_RACECHECK.name)
    with emulator.schedule("random:1"):
        for T, D, causal in ((130, 64, True), (97, 128, False), (7, 64, False)):
            r = check_precision(tc, T=T, D=D, causal=causal, dtype=torch.bfloat16)
            assert r.ok, str(r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (the emulated "
                    "tests above run the same kernels)")
def test_tc_on_a_gpu_within_2x_of_torch():
    """The nvcc build on a real GPU (sm_80+), forward and backward, by the same rule."""
    for dtype in (torch.bfloat16, torch.float16):
        for case in CASES:
            check(dtype, *case, device="cuda")
        for case in BWD_CASES + [(2, 4, 1024, 1024, 64, True), (1, 2, 1024, 1024, 128, False)]:
            for name, (err, base, top) in zip(("o", "dq", "dk", "dv"),
                                              grad_errors(dtype, *case, device="cuda")):
                assert err <= FACTOR * base + SLACK * top, (dtype, case, name, err, base)
