"""Conformance of the row-wise kernels (LayerNorm, softmax cross-entropy, bias + GELU: csrc/cpu/
layernorm.c, cross_entropy.c, bias_gelu.c and their .cu twins under the CUDA emulator) against
float64 torch references, forward and backward, on odd shapes; determinism of the parameter
gradients; typed errors; bfloat16; what the autograd graph keeps.

Errors are measured as in gptlab.testing: ``max |x - ref| / (|ref| + rms(ref))`` per tensor, the
gradients against the largest gradient RMS (LayerNorm's dx is exactly 0 when C = 1).
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from gptlab.plugins.cuda_kernels import loader, ops
from gptlab.plugins.cuda_kernels.loader import KernelError
from gptlab.testing import _rms, relative_error
from gptlab.verify import emulator

ROWS = (1, 7, 33)
DIMS = (1, 3, 65, 192, 257)
VOCABS = (1, 111, 130)
EMU_DIMS = (1, 3, 65, 257)  # the emulator runs a fiber per thread: keep its cases small

#: per-kernel tolerances on the relative error (float32 kernels vs a float64 reference)
TOL = {"layer_norm": (1e-5, 1e-4), "cross_entropy": (1e-6, 2e-6), "bias_gelu": (1e-6, 3e-6)}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _error(out, ref) -> float:
    """relative_error, absolute where the reference is exactly 0 (cross-entropy over V = 1: the
    loss and its gradient are 0)."""
    return relative_error(out, ref, None if _rms(ref) else 1.0)


def _grad_error(grads, refs) -> float:
    floor = max(_rms(r) for r in refs) or 1.0
    return max(relative_error(g, r, floor) for g, r in zip(grads, refs))


# ------------------------------------------------------------------------ the checkers
def check_layer_norm(flavour, rows, C, *, bias=True, seed=0, shift=5.0):
    """(output error, gradient error) of gptlab::layer_norm vs F.layer_norm in float64. x has a
    mean far from 0 (``shift``): a one-pass E[x^2] - mean^2 variance would fail here."""
    g = _gen(seed)
    x = torch.randn(rows, C, generator=g) * 2 + shift
    w = torch.randn(C, generator=g)
    b = torch.randn(C, generator=g) if bias else None
    dy = torch.randn(rows, C, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    y, mean, rstd = ops.layer_norm(leaves[0], leaves[1], leaves[2] if bias else None, 1e-5,
                                   flavour)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = F.layer_norm(ref_leaves[0], (C,), ref_leaves[1], ref_leaves[2] if bias else None, 1e-5)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy.double())
    x64 = x.double()
    stats_err = max(relative_error(mean, x64.mean(-1)),
                    relative_error(rstd, (x64.var(-1, unbiased=False) + 1e-5).rsqrt()))
    return max(relative_error(y, ref), stats_err), _grad_error(grads, ref_grads)


def check_cross_entropy(flavour, n, V, *, seed=0, scale=3.0):
    g = _gen(seed)
    logits = torch.randn(n, V, generator=g) * scale
    targets = torch.randint(0, V, (n,), generator=g)
    dloss = torch.rand((), generator=g) + 0.5
    leaf = logits.clone().requires_grad_()
    loss = ops.cross_entropy(leaf, targets, flavour)
    (grad,) = torch.autograd.grad(loss, leaf, dloss)
    ref_leaf = logits.double().requires_grad_()
    ref = F.cross_entropy(ref_leaf, targets)
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf, dloss.double())
    assert loss.shape == () and loss.dtype == torch.float32
    return _error(loss, ref), _grad_error([grad], [ref_grad])


def check_bias_gelu(flavour, rows, Fd, *, seed=0):
    """x spans GELU's negative tail (|x + b| up to ~12), where 1 + erf cancels."""
    g = _gen(seed)
    x, b = torch.randn(rows, Fd, generator=g) * 3, torch.randn(Fd, generator=g)
    dy = torch.randn(rows, Fd, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, b)]
    y = ops.bias_gelu(*leaves, flavour)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.double().requires_grad_() for t in (x, b)]
    ref = F.gelu(ref_leaves[0] + ref_leaves[1])
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy.double())
    return relative_error(y, ref), _grad_error(grads, ref_grads)


def _assert_within(op, errors, case):
    out_tol, grad_tol = TOL[op]
    out_err, grad_err = errors
    assert out_err < out_tol and grad_err < grad_tol, (
        f"{op} {case}: out err {out_err:.2e} (tol {out_tol:g}), grad err {grad_err:.2e} "
        f"(tol {grad_tol:g})")


# ------------------------------------------------------------------------ C kernels
@pytest.mark.parametrize("rows, C", list(itertools.product(ROWS, DIMS)))
def test_layer_norm_conformance(rows, C):
    _assert_within("layer_norm", check_layer_norm("native", rows, C), (rows, C))
    if C > 1:  # without bias (C = 1 would give y = 0: a reference that tests nothing)
        _assert_within("layer_norm", check_layer_norm("native", rows, C, bias=False, seed=1),
                       (rows, C, "no bias"))


@pytest.mark.parametrize("n, V", list(itertools.product(ROWS, VOCABS)))
def test_cross_entropy_conformance(n, V):
    _assert_within("cross_entropy", check_cross_entropy("native", n, V), (n, V))


def test_cross_entropy_large_logits():
    """Logits in the hundreds: the max shift must keep exp finite and the loss accurate."""
    _assert_within("cross_entropy", check_cross_entropy("native", 33, 130, scale=100.0),
                   "logits x100")


@pytest.mark.parametrize("rows, Fd", list(itertools.product(ROWS, DIMS + (768,))))
def test_bias_gelu_conformance(rows, Fd):
    _assert_within("bias_gelu", check_bias_gelu("native", rows, Fd), (rows, Fd))


@pytest.mark.parametrize("flavour", ["native", "cuda-emu"])
def test_bias_gelu_normal_cdf_and_derivative_are_accurate(flavour):
    """Phi = gelu(u) / u and gelu'(u) against float64 erfc, densely over [-12, 12] (both sides
    saturated): the C kernel's rational erf is within 2.5e-7 of Phi (torch's float32 gelu, with
    Abramowitz & Stegun's erf, is within about 1.5e-7)."""
    u = torch.linspace(-12.0, 12.0, 4801 if flavour == "native" else 481)
    u = u[u != 0][None].requires_grad_()
    y = ops.bias_gelu(u, torch.zeros(u.shape[1]), flavour)
    (g,) = torch.autograd.grad(y.sum(), u)
    u64 = u.detach().double()
    cdf = 0.5 * torch.special.erfc(-u64 / math.sqrt(2))
    pdf = torch.exp(-u64 * u64 / 2) / math.sqrt(2 * math.pi)
    assert (y.double() / u64 - cdf).abs().max() < 3e-7
    assert (g.double() - (cdf + u64 * pdf)).abs().max() < 1e-6


# ------------------------------------------------------------------------ emulated CUDA
@pytest.mark.parametrize("schedule, flavour", [(s, "cuda-emu") for s in emulator.DEFAULT_SCHEDULES]
                         + [("inorder", "cuda-emu-numerics")])
def test_emulated_cuda_row_kernels_conform(schedule, flavour):
    """layernorm.cu, cross_entropy.cu and bias_gelu.cu on the CPU, forward and backward; also
    with a GPU's numerics (cuda-emu-numerics: FMA contraction, expf / logf / erfcf off by up to
    their GPU error)."""
    with emulator.schedule(schedule):
        for rows, C in itertools.product(ROWS, EMU_DIMS):
            _assert_within("layer_norm", check_layer_norm(flavour, rows, C), (rows, C))
            _assert_within("bias_gelu", check_bias_gelu(flavour, rows, C), (rows, C))
        _assert_within("layer_norm", check_layer_norm(flavour, 7, 65, bias=False), "no bias")
        for n, V in itertools.product(ROWS, VOCABS):
            _assert_within("cross_entropy", check_cross_entropy(flavour, n, V), (n, V))
        _assert_within("cross_entropy",
                       check_cross_entropy(flavour, 7, 130, scale=100.0), "logits x100")


def test_emulated_cuda_kernels_match_the_c_kernels_for_more_chunks_than_one():
    """65 rows: three chunks of 32 rows in the column sums (dweight, dbias)."""
    g = _gen(5)
    x, w, b = torch.randn(65, 40, generator=g), torch.randn(40, generator=g), torch.randn(40)
    dy = torch.randn(65, 40, generator=g)
    out = {}
    for flavour in ("native", "cuda-emu"):
        y, mean, rstd = ops.layer_norm(x, w, b, 1e-5, flavour)
        out[flavour] = (*ops.layer_norm_backward(dy, x, w, mean, rstd, True, flavour),
                        *ops.bias_gelu_backward(dy, x, b, flavour))
    for a, r in zip(out["cuda-emu"], out["native"]):
        assert torch.allclose(a, r, rtol=1e-5, atol=1e-5)


def test_emulated_cross_entropy_marks_bad_targets_nan_when_unchecked():
    """On a GPU the op cannot check targets without a host sync: the kernel makes the row NaN.
    Called raw (past the op's check), the emulated kernel shows that contract."""
    lib = loader.load("cuda-emu")
    logits = torch.randn(3, 5)
    targets = torch.tensor([0, 7, 2])
    loss, losses, dl = torch.empty(()), torch.empty(3), torch.empty(3, 5)
    lib.call("gptlab_cross_entropy_forward_f32", lib.ptr(loss), lib.ptr(losses), lib.ptr(dl),
             lib.ptr(logits), lib.ptr(targets, "int64_t *"), 3, 5, lib.ffi.NULL, 1)
    assert math.isnan(loss.item()) and losses.isnan().tolist() == [False, True, False]
    assert dl[1].isnan().all() and torch.isfinite(dl[[0, 2]]).all()


# ------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("flavour", ["native", "cuda-emu"])
def test_parameter_gradients_do_not_depend_on_the_thread_count(flavour):
    """dweight / dbias are summed per fixed chunk of rows and the chunks added in order."""
    lib = loader.load("cpu" if flavour == "native" else flavour)
    g = _gen(2)
    rows, C = (1000, 65) if flavour == "native" else (70, 33)
    x, w, dy = torch.randn(rows, C, generator=g), torch.randn(C), torch.randn(rows, C)
    _, mean, rstd = ops.layer_norm(x, w, None, 1e-5, flavour)
    results = []
    for threads in (1, 2, 3, 8):
        dx, dw, db = torch.empty_like(x), torch.empty(C), torch.empty(C)
        ws = torch.empty(lib.lib.gptlab_layernorm_backward_workspace_size(rows, C) // 4)
        lib.call("gptlab_layernorm_backward_f32", lib.ptr(dx), lib.ptr(dw), lib.ptr(db),
                 lib.ptr(ws, "void *"), lib.ptr(dy), lib.ptr(x), lib.ptr(w), lib.ptr(mean),
                 lib.ptr(rstd), rows, C, lib.ffi.NULL, threads)
        gx, gb = torch.empty_like(x), torch.empty(C)
        ws = torch.empty(lib.lib.gptlab_bias_gelu_backward_workspace_size(rows, C) // 4)
        lib.call("gptlab_bias_gelu_backward_f32", lib.ptr(gx), lib.ptr(gb),
                 lib.ptr(ws, "void *"), lib.ptr(dy), lib.ptr(x), lib.ptr(w), rows, C,
                 lib.ffi.NULL, threads)
        results.append((dx, dw, db, gx, gb))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("flavour", ["native", "cuda-emu"])
def test_bias_gelu_backward_without_dbias(flavour):
    """dbias = NULL: dx alone, no workspace needed."""
    lib = loader.load("cpu" if flavour == "native" else flavour)
    x, b, dy = torch.randn(9, 20), torch.randn(20), torch.randn(9, 20)
    dx = torch.empty_like(x)
    lib.call("gptlab_bias_gelu_backward_f32", lib.ptr(dx), lib.ffi.NULL, lib.ffi.NULL,
             lib.ptr(dy), lib.ptr(x), lib.ptr(b), 9, 20, lib.ffi.NULL, 1)
    assert torch.equal(dx, ops.bias_gelu_backward(dy, x, b, flavour)[0])


# ------------------------------------------------------------------------ ops: dtypes, errors
def test_bfloat16_inputs_are_widened_and_rounded_back():
    g = _gen(3)
    x = torch.randn(4, 8, 64, generator=g)
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    xb = x.bfloat16()
    y, mean, rstd = ops.layer_norm(xb, w, b, 1e-5)  # bfloat16 activations, float32 parameters
    assert y.dtype == torch.bfloat16 and mean.dtype == rstd.dtype == torch.float32
    ref = F.layer_norm(xb.float(), (64,), w, b)
    assert torch.allclose(y.float(), ref, atol=2e-2, rtol=1e-2)
    h = ops.bias_gelu(xb, b)
    assert h.dtype == torch.float32  # like F.gelu(xb + b): promoted
    assert torch.allclose(h, F.gelu(xb.float() + b), atol=1e-5)
    hb = ops.bias_gelu(xb, b.bfloat16())
    assert hb.dtype == torch.bfloat16
    logits = xb.reshape(-1, 64).requires_grad_()
    targets = torch.randint(0, 64, (32,), generator=g)
    loss = ops.cross_entropy(logits, targets)
    assert loss.dtype == torch.bfloat16
    loss.backward()
    ref_logits = logits.detach().float().requires_grad_()
    F.cross_entropy(ref_logits, targets).backward()
    assert logits.grad.dtype == torch.bfloat16
    assert torch.allclose(logits.grad.float(), ref_logits.grad, atol=1e-3)


def test_bad_inputs_are_one_line_typed_errors():
    x = torch.randn(2, 3, 8)
    cases = [
        (lambda: ops.layer_norm(x, torch.ones(7), None, 1e-5),
         r"^layer_norm: weight is \(7,\), expected \(8,\)$"),
        (lambda: ops.layer_norm(x, torch.ones(8), torch.ones(2, 8), 1e-5),
         r"^layer_norm: bias is \(2, 8\), expected \(8,\)$"),
        (lambda: ops.layer_norm(x.double(), torch.ones(8), None, 1e-5),
         r"^layer_norm: the cpu kernels take float32 or bfloat16, got float64 for x$"),
        (lambda: ops.layer_norm(x, torch.ones(8), None, 1e-5, "cuda-emu"),
         None),  # fine: float32
        (lambda: ops.bias_gelu(x.bfloat16(), torch.ones(8), "cuda-emu"),
         r"^bias_gelu: the cuda-emu kernels take float32, got bfloat16 for x$"),
        (lambda: ops.bias_gelu(x, torch.ones(9)),
         r"^bias_gelu: bias is \(9,\), expected \(8,\)$"),
        (lambda: ops.cross_entropy(torch.randn(4, 5), torch.tensor([0, 1, 5, 2])),
         r"^cross_entropy: targets must be in \[0, 5\), got values in \[0, 5\]$"),
        (lambda: ops.cross_entropy(torch.randn(4, 5), torch.tensor([0, -100, 1, 2]), "cuda-emu"),
         r"^cross_entropy: targets must be in \[0, 5\), got values in \[-100, 2\]$"),
        (lambda: ops.cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.int32)),
         r"^cross_entropy: targets must be int64 on cpu, got int32 on cpu$"),
        (lambda: ops.cross_entropy(torch.randn(4, 5), torch.zeros(3, dtype=torch.long)),
         r"^cross_entropy: targets is \(3,\), expected \(4,\)$"),
        (lambda: ops.cross_entropy(torch.randn(2, 4, 5), torch.zeros(8, dtype=torch.long)),
         r"^cross_entropy: logits must be \(N, V\) with N, V >= 1, got \(2, 4, 5\)$"),
    ]
    for fn, pattern in cases:
        if pattern is None:
            fn()
            continue
        with pytest.raises(KernelError, match=pattern):
            fn()
    # the C kernels check too (called raw, past the op's checks)
    lib = loader.load("cpu")
    logits, targets = torch.randn(2, 3), torch.tensor([1, 3])
    with pytest.raises(KernelError, match=r"targets\[1\] = 3 is outside \[0, 3\)"):
        lib.call("gptlab_cross_entropy_forward_f32", lib.ptr(torch.empty(())),
                 lib.ptr(torch.empty(2)), lib.ffi.NULL, lib.ptr(logits),
                 lib.ptr(targets, "int64_t *"), 2, 3, lib.ffi.NULL, 1)
    for flavour in ("cpu", "cuda-emu"):
        lib = loader.load(flavour)
        p = lib.ffi.cast("float *", 8)
        with pytest.raises(KernelError, match=r"layernorm_forward: sizes must be >= 1"):
            lib.call("gptlab_layernorm_forward_f32", p, p, p, p, p, lib.ffi.NULL, 4, 0, 1e-5,
                     lib.ffi.NULL, 1)
        with pytest.raises(KernelError, match=r"eps must be finite and >= 0"):
            lib.call("gptlab_layernorm_forward_f32", p, p, p, p, p, lib.ffi.NULL, 4, 4, -1.0,
                     lib.ffi.NULL, 1)
        with pytest.raises(KernelError, match=r"bias_gelu_forward: null pointer"):
            lib.call("gptlab_bias_gelu_forward_f32", p, p, lib.ffi.NULL, 4, 4, lib.ffi.NULL, 1)


# ------------------------------------------------------------------------ autograd graph
def test_cross_entropy_keeps_only_the_gradient_and_none_without_grad():
    N, V = 64, 111
    logits = torch.randn(N, V, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ops.cross_entropy(logits, targets)
    assert saved == [N * V]  # dlogits, computed in the forward; no probabilities, no logits
    loss.backward()
    with torch.no_grad():  # no gradient wanted: the kernel writes no dlogits
        _, dlogits = ops.cross_entropy_forward(logits, targets, False)
    assert dlogits.shape == (0,)
    assert torch.allclose(ops.cross_entropy(logits.detach(), targets),
                          F.cross_entropy(logits.detach(), targets))


def test_layer_norm_statistics_have_no_gradient_and_bias_may_be_absent():
    x = torch.randn(3, 5, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    y, mean, rstd = ops.layer_norm(x, w, None, 1e-5)
    assert y.requires_grad and not mean.requires_grad and not rstd.requires_grad
    assert mean.shape == rstd.shape == (3, 5)
    y.sum().backward()
    ref_x, ref_w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.layer_norm(ref_x, (16,), ref_w).sum().backward()
    assert torch.allclose(x.grad, ref_x.grad, atol=1e-5) and torch.allclose(w.grad, ref_w.grad,
                                                                             atol=1e-4)


def test_row_ops_under_torch_compile():
    """The three ops traced whole (fullgraph, AOT autograd on fake tensors), eager == compiled."""
    def step(x, w, b, b2, targets):
        h, _, _ = ops.layer_norm(x, w, b, 1e-5)
        h = ops.bias_gelu(h, b2)
        return ops.cross_entropy(h.reshape(-1, h.shape[-1]), targets)

    g = _gen(4)
    args = [torch.randn(2, 8, 24, generator=g), torch.randn(24, generator=g),
            torch.randn(24, generator=g), torch.randn(24, generator=g)]
    targets = torch.randint(0, 24, (16,), generator=g)
    eager_leaves = [a.clone().requires_grad_() for a in args]
    eager = step(*eager_leaves, targets)
    eager.backward()
    leaves = [a.clone().requires_grad_() for a in args]
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(*leaves, targets)
    compiled.backward()
    assert torch.allclose(eager, compiled, atol=1e-6)
    for a, b in zip(eager_leaves, leaves):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_eager_entry_points_match_the_registered_ops():
    """ops.layer_norm / cross_entropy / bias_gelu skip the dispatcher in eager mode: same values
    and gradients, bit for bit, as torch.ops.gptlab.*; under a fake-tensor mode they use the
    registered ops (and so their fakes)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = _gen(6)
    x, w, b = torch.randn(3, 5, 16, generator=g), torch.randn(16), torch.randn(16)
    targets = torch.randint(0, 16, (15,), generator=g)
    runs = {}
    for path, (ln, ce, bg) in {
            "eager": (ops.layer_norm, ops.cross_entropy, ops.bias_gelu),
            "op": (torch.ops.gptlab.layer_norm, torch.ops.gptlab.cross_entropy,
                   torch.ops.gptlab.bias_gelu)}.items():
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        h = ln(leaves[0], leaves[1], leaves[2], 1e-5)[0]
        loss = ce(bg(h, leaves[2]).reshape(15, 16), targets)
        loss.backward()
        runs[path] = [loss, h, *(t.grad for t in leaves)]
    assert all(torch.equal(a, b) for a, b in zip(runs["eager"], runs["op"]))
    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        y, mean, _ = ops.layer_norm(fx, fw, None, 1e-5)
        assert y.shape == x.shape and mean.shape == (3, 5) and mean.dtype == torch.float32
        assert ops.bias_gelu(fx, fw).shape == x.shape
