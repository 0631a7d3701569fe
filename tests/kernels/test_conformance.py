"""The conformance suite (gptlab.testing) on every registered CPU backend, and proof that it
catches a wrong backend."""
import math

import pytest

from gptlab.plugins.cuda_kernels.backends import FlashAttention
from gptlab.testing import OUT_TOL, Case, check_case, run_conformance


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
