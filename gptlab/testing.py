"""Public conformance suite for attention backends: ours and any third party's.

Run it from your own tests::

    from gptlab.testing import run_conformance
    def test_my_backend():
        run_conformance(MyBackend())          # raises AssertionError listing every failure

Each case compares a backend's output and its q/k/v gradients (float32) with a float64
reference (explicit softmax attention) on awkward shapes: T in {1, 2, 7, 64, 65, 97, 255}, head
dims in {8, 16, 32, 64, 80}, causal and not, batch*heads in {1, 6}; plus large logits (q scaled
x20), fewer and more queries than keys (bottom-right causal mask; rows that see no key give 0)
where the backend declares support, and
repeat-for-equality determinism where it declares it (``is_deterministic(device)``). Errors are measured
element-wise relative to the reference, with the reference's RMS as a floor for tiny entries:
``max |x - ref| / (|ref| + rms(ref))`` (gradients use the largest of the three gradient RMS
values as the floor, since dq and dk are exactly zero at T = 1); a degenerate (all-zero)
reference fails the case.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import attrs
import torch

from gptlab.core.attention import AttentionBackend, AttentionRequest

SEQ_LENS = (1, 2, 7, 64, 65, 97, 255)
HEAD_DIMS = (8, 16, 32, 64, 80)
BATCH_HEADS = ((1, 1), (2, 3))  # (B, nh): B*nh = 1 and 6
OUT_TOL = 1e-4
GRAD_TOL = 1e-3


@attrs.frozen
class Case:
    B: int
    nh: int
    tq: int
    tk: int
    hs: int
    causal: bool
    q_scale: float = 1.0

    def __str__(self):
        big = f" q*{self.q_scale:g}" if self.q_scale != 1 else ""
        return (f"B={self.B} nh={self.nh} tq={self.tq} tk={self.tk} hs={self.hs} "
                f"causal={self.causal}{big}")


@attrs.frozen
class CaseResult:
    case: Case
    out_error: float
    grad_error: float
    deterministic: bool | None  # None: not checked

    @property
    def ok(self) -> bool:
        return (self.out_error < OUT_TOL and self.grad_error < GRAD_TOL
                and self.deterministic is not False)


def reference_attention(q, k, v, causal: bool, scale: float | None = None) -> torch.Tensor:
    """Float64 softmax attention with a bottom-right aligned causal mask (rows that see no key,
    the first ``tq - tk`` when there are more queries than keys, give 0)."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    if not causal:
        return torch.softmax(s, dim=-1) @ v
    tq, tk = q.size(-2), k.size(-2)
    keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    blind = ~keep.any(dim=-1, keepdim=True)  # rows that see no key (tq > tk): output 0
    p = torch.softmax(s.masked_fill(~(keep | blind), float("-inf")), dim=-1)
    return p.masked_fill(blind, 0.0) @ v


def _rms(t: torch.Tensor) -> float:
    return t.detach().double().pow(2).mean().sqrt().item()


def relative_error(actual: torch.Tensor, ref: torch.Tensor, floor: float | None = None) -> float:
    """``max |a - r| / (|r| + floor)`` with ``floor`` the RMS of ``ref`` by default."""
    a, r = actual.detach().double().cpu(), ref.detach().double().cpu()
    if a.shape != r.shape or not torch.isfinite(a).all():
        return math.inf
    floor = _rms(r) if floor is None else floor
    if floor == 0:  # degenerate reference: a case that tests nothing
        return math.inf
    return ((a - r).abs() / (r.abs() + floor)).max().item()


def default_cases(backend: type[AttentionBackend] | AttentionBackend, *,
                  seq_lens=SEQ_LENS, head_dims=HEAD_DIMS) -> list[Case]:
    cls = backend if isinstance(backend, type) else type(backend)
    cases = []
    for (B, nh), T, hs, causal in itertools.product(BATCH_HEADS, seq_lens, head_dims,
                                                    (True, False)):
        if cls.min_head_dim <= hs <= cls.max_head_dim:
            cases.append(Case(B, nh, T, T, hs, causal))
    hs = 32 if cls.min_head_dim <= 32 <= cls.max_head_dim else cls.min_head_dim
    odd = 33 if cls.min_head_dim <= 33 <= cls.max_head_dim else hs
    cases += [Case(2, 3, 97, 97, hs, True, q_scale=20.0),
              Case(1, 2, 64, 64, hs, False, q_scale=20.0)]
    if cls.supports_q_shorter_than_k:
        cases += [Case(2, 3, 1, 65, hs, True), Case(1, 2, 7, 97, hs, True),
                  Case(1, 2, 7, 97, hs, False),
                  Case(1, 2, 9, 4, hs, True), Case(1, 2, 9, 4, hs, False),  # more q than k
                  # decoding shapes (1-3 new rows against a long cache; odd head dim, keys in
                  # several blocks, large scores so the running max moves)
                  Case(1, 2, 1, 1, hs, True), Case(2, 3, 2, 130, hs, True),
                  Case(1, 2, 3, 200, odd, False, q_scale=20.0),
                  Case(1, 2, 1, 200, odd, True, q_scale=20.0)]
    return cases


def check_case(backend: AttentionBackend, case: Case, device="cpu", seed: int = 0) -> CaseResult:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    q = rnd(case.B, case.nh, case.tq, case.hs) * case.q_scale
    k, v = rnd(case.B, case.nh, case.tk, case.hs), rnd(case.B, case.nh, case.tk, case.hs)
    dout = rnd(case.B, case.nh, case.tq, case.hs)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = backend(*leaves, causal=case.causal)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_leaves, causal=case.causal)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    out_err = relative_error(out, ref)
    # dq and dk are exactly 0 when T = 1 (softmax over one key is constant): measure every
    # gradient against the largest gradient RMS so such zeros are compared, not divided by.
    floor = max(_rms(r) for r in ref_grads)
    grad_err = max(relative_error(g, r, floor) for g, r in zip(grads, ref_grads))
    det = None
    if type(backend).is_deterministic(torch.device(device).type):
        leaves2 = [t.clone().requires_grad_() for t in (q, k, v)]
        out2 = backend(*leaves2, causal=case.causal)
        grads2 = torch.autograd.grad(out2, leaves2, dout)
        det = torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    return CaseResult(case, out_err, grad_err, det)


def run_conformance(backend: AttentionBackend, *, device: str = "cpu",
                    cases: list[Case] | None = None,
                    on_result: Callable[[CaseResult], object] | None = None
                    ) -> list[CaseResult]:
    """Run every case; raise AssertionError listing the failures, else return the results.

    ``on_result`` is called after each case (for progress display)."""
    req = AttentionRequest(device=torch.device(device).type, dtype=torch.float32,
                           head_dim=32, q_len=64, k_len=64)
    reasons = type(backend).not_supported_reasons(req)
    if reasons:
        raise AssertionError(f"backend {backend.name!r} cannot run on {device}: "
                             f"{'; '.join(reasons)}")
    results = []
    for case in cases or default_cases(backend):
        results.append(check_case(backend, case, device))
        if on_result is not None:
            on_result(results[-1])
    bad = [r for r in results if not r.ok]
    if bad:
        lines = [f"{r.case}: out err {r.out_error:.2e} (tol {OUT_TOL:g}), grad err "
                 f"{r.grad_error:.2e} (tol {GRAD_TOL:g})"
                 + (", not deterministic" if r.deterministic is False else "") for r in bad]
        raise AssertionError(f"{backend.name}: {len(bad)}/{len(results)} cases failed:\n"
                             + "\n".join(lines))
    return results
