"""The conformance suite (gptlab.testing) on every registered CPU backend, proof that it
catches a wrong backend, and FlashAttention's accuracy rule for the flash kernels at a long
causal sequence (gptlab.testing.check_precision), and that the rule catches what the
per-element tolerances pass."""
import math

import pytest
import torch

from gptlab.plugins.cuda_kernels.backends import FlashAttention
from gptlab.testing import OUT_TOL, Case, check_case, check_precision, run_conformance
from gptlab.verify.emulated import EmulatedFlash


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
    result = check_precision(cls(), T=2048, D=64, causal=True, device=device)
    assert result.ok, f"{cls.name} on {device}, T=2048: error vs float64 > 2x float32 torch's: " \
                      + "; ".join(result.failures())


def test_precision_rule_catches_an_error_the_tolerances_pass():
    """A backend a hair off (values scaled by 1 + 1e-5: errors ~10x float32 torch's) passes the
    per-element tolerances and fails the rule; plain torch passes it, in bfloat16 too."""
    from gptlab.testing import plain_attention

    class Plain(FlashAttention):
        name = "plain"

        def forward(self, q, k, v, *, causal=True, dropout_p=0.0, scale=None):
            return plain_attention(q, k, v, causal)

    class Off(Plain):
        name = "off"

        def forward(self, q, k, v, *, causal=True, dropout_p=0.0, scale=None):
            return super().forward(q, k, v * (1 + 1e-5), causal=causal)

    assert check_precision(Plain(), T=256, causal=True).ok
    bad = check_precision(Off(), T=256, causal=True)
    assert not bad.ok and bad.failures()[0].startswith("o: ") and bad.worst_ratio > 2
    assert check_case(Off(), Case(1, 2, 65, 65, 16, True)).ok
    low = check_precision(Plain(), T=128, causal=False, dtype=torch.bfloat16)
    assert low.ok and low.dtype == torch.bfloat16 and low.baseline[0] > 1e-4  # bfloat16's error
