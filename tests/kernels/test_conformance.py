"""The conformance suite (gptlab.testing) on every registered CPU backend, proof that it
catches a wrong backend, and FlashAttention's accuracy rule for the flash kernels at a long
causal sequence."""
import math

import pytest
import torch

from gptlab.plugins.cuda_kernels.backends import EmulatedFlash, FlashAttention
from gptlab.testing import OUT_TOL, Case, check_case, reference_attention, run_conformance

#: FlashAttention's accuracy rule (the tests of Dao et al.'s flash-attention): a kernel's max abs
#: error against a float64 reference is at most PRECISION_FACTOR times that of the plain float32
#: torch implementation against the same reference, plus one float32 ulp of the reference's
#: largest entry. The suite's per-element tolerances (GRAD_TOL) pass errors several times that
#: of float32 torch; this rule caught float32 sums over all tq queries in the flash backward
#: (dk, dv errors 3-6x torch's at T = 2048, causal).
PRECISION_FACTOR = 2.0


def test_conformance_suite(backend):
    """Every registered CPU backend: outputs and q/k/v grads vs float64 on odd shapes."""
    results = run_conformance(backend)
    assert len(results) >= 140
    worst = max(r.out_error for r in results)
    assert worst < OUT_TOL


def test_conformance_catches_a_wrong_backend(registry):
    class OffByScale(FlashAttention):
        name = "broken"

        def forward(self, q, k, v, *, causal=True, dropout_p=0.0, scale=None):
            return super().forward(q, k, v, causal=causal, scale=1.01 / math.sqrt(q.size(-1)))

    class LeakyMask(FlashAttention):
        name = "leaky"

        def forward(self, q, k, v, *, causal=True, dropout_p=0.0, scale=None):
            return super().forward(q, k, v, causal=False)

    with pytest.raises(AssertionError, match="cases failed"):
        run_conformance(OffByScale(), cases=[Case(1, 2, 65, 65, 16, True)])
    with pytest.raises(AssertionError, match="causal=True"):
        run_conformance(LeakyMask(), cases=[Case(1, 2, 7, 7, 8, True)])
    assert check_case(LeakyMask(), Case(1, 2, 7, 7, 8, False)).ok


def float32_attention(q, k, v, causal: bool) -> torch.Tensor:
    """softmax(QKᵀ·s + mask) V in plain float32 torch ops: the rule's baseline."""
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    if causal:
        tq, tk = q.size(-2), k.size(-2)
        keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def max_errors(attention, q, k, v, dout, ref) -> list[float]:
    """Max abs error of o, dq, dk, dv of ``attention`` (float32) against ``ref`` (float64)."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves)
    got = [out, *torch.autograd.grad(out, leaves, dout)]
    return [(g.double() - r).abs().max().item() for g, r in zip(got, ref)]


@pytest.mark.parametrize("cls, device", [
    (FlashAttention, "cpu"),
    (EmulatedFlash, "cpu"),  # the .cu kernels in the emulator: ~5 s
    pytest.param(FlashAttention, "cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA GPU here (the emulated case runs)")),
], ids=["flash", "flash-emu", "flash-cuda"])
def test_flash_within_2x_of_float32_torch_at_a_long_causal_sequence(cls, device):
    """o, dq, dk, dv error vs float64 <= 2x float32 torch's (+ 1 ulp): FlashAttention's rule,
    at T = 2048 (causal, D = 64, B = H = 1: a few seconds). An error that grows with T, such as
    a float32 running sum over all queries, passes at T <= 512 and fails here."""
    T = 2048
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, 1, T, 64, generator=gen).to(device) for _ in range(4))
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    out64 = reference_attention(*leaves64, causal=True)
    ref = [out64.detach(), *torch.autograd.grad(out64, leaves64, dout.double())]
    base = max_errors(lambda *t: float32_attention(*t, causal=True), q, k, v, dout, ref)
    errors = max_errors(lambda *t: cls()(*t, causal=True), q, k, v, dout, ref)
    ulps = [torch.finfo(torch.float32).eps * r.abs().max().item() for r in ref]
    bad = [f"{name}: {err:.2e} > {PRECISION_FACTOR:g} x {b:.2e} + {ulp:.1e}"
           for name, err, b, ulp in zip(("o", "dq", "dk", "dv"), errors, base, ulps)
           if not err <= PRECISION_FACTOR * b + ulp]
    assert not bad, f"{cls.name} on {device}, T={T}: error vs float64 > 2x float32 torch's: " \
                    + "; ".join(bad)
