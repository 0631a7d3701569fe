"""The conformance section: every checked attention backend per dtype it declares (float32 by
the conformance suite, lower precisions by FlashAttention's precision rule on a few shapes), the
rule at a long causal sequence, and the layer kernels; a failure is one line and the next check
runs."""

from __future__ import annotations

import time

from gptlab.core.errors import first_line
from gptlab.verify.gpucheck.options import QUICK_HEAD_DIMS, QUICK_SEQ_LENS, Options
from gptlab.verify.gpucheck.report import Progress, Section
from gptlab.verify.gpucheck.targets import Target, dtype_name, dtypes_of


def run(s: Section, t: Target, o: Options, progress: Progress) -> None:
    _attention(s, t, o, progress)
    s.add()
    _long_precision_rule(s, t, o, progress)
    s.add()
    _layer_kernels(s, t, progress)


def _runnable(s: Section, classes, request, kind: str):
    """(cls, dtype, label) for each class and each dtype it declares that runs on the target; a
    skip line with the reasons for each that does not."""
    for cls in classes:
        for dtype in dtypes_of(cls):
            label = f"{kind}`{cls.name}` {dtype_name(dtype)}"
            reasons = cls.not_supported_reasons(request(dtype))
            if reasons:
                s.add(f"- skip {label}: {'; '.join(reasons)}")
            else:
                yield cls, dtype, label


def _attention(s: Section, t: Target, o: Options, progress: Progress) -> None:
    import torch

    from gptlab.testing import (GRAD_TOL, OUT_TOL, Case, check_precision, default_cases,
                                run_conformance)

    for cls, dtype, label in _runnable(s, t.attention, t.attention_request, ""):
        progress(f"conformance: {cls.name} {dtype_name(dtype)}")
        start = time.perf_counter()
        try:
            if dtype == torch.float32:
                cases = (default_cases(cls, seq_lens=QUICK_SEQ_LENS, head_dims=QUICK_HEAD_DIMS)
                         if o.quick else None)
                results = run_conformance(cls(), device=t.device, cases=cases)
                s.add(f"- pass {label}: {len(results)} cases, worst out err "
                      f"{max(r.out_error for r in results):.1e} (tol {OUT_TOL:g}), "
                      f"grad err {max(r.grad_error for r in results):.1e} (tol "
                      f"{GRAD_TOL:g}), {time.perf_counter() - start:.1f} s")
            else:  # below float32: the precision rule on a few shapes
                shapes = [Case(1, 1, T, T, D, c) for T in (65, 255)
                          for D in (64, 128) if cls.min_head_dim <= D <= cls.max_head_dim
                          for c in (True, False)]
                results = [check_precision(cls(), T=c.tq, D=c.hs, causal=c.causal,
                                           device=t.device, dtype=dtype) for c in shapes]
                bad = [r for r in results if not r.ok]
                if bad:
                    raise AssertionError(f"{len(bad)}/{len(results)} shapes fail the "
                                         f"precision rule:\n" + "\n".join(map(str, bad)))
                s.add(f"- pass {label}: precision rule on {len(results)} shapes, worst "
                      f"error / torch's {max(r.worst_ratio for r in results):.2f}")
        except Exception as e:  # a wrong result, or an error: the next one still runs
            lines = str(e).splitlines() or [""]
            kind = "" if isinstance(e, AssertionError) else f"({type(e).__name__}) "
            s.fail(f"- FAIL {label}: {kind}{lines[0]}")
            s.lines += [f"    - {ln}" for ln in lines[1:11]]


def _long_precision_rule(s: Section, t: Target, o: Options, progress: Progress) -> None:
    from gptlab.testing import check_precision

    for cls in t.attention:
        for dtype in dtypes_of(cls):
            if cls.not_supported_reasons(t.attention_request(dtype, T=o.rule_T)):
                continue
            progress(f"precision rule at T={o.rule_T}: {cls.name} {dtype_name(dtype)}")
            try:
                r = check_precision(cls(), T=o.rule_T, D=64, causal=True, device=t.device,
                                    dtype=dtype)
            except Exception as e:
                s.fail(f"- FAIL precision rule, causal T={o.rule_T} D=64: `{cls.name}` "
                       f"{dtype_name(dtype)}: ({type(e).__name__}) {first_line(e)}")
                continue
            line = f"precision rule, causal T={o.rule_T} D=64: {r}"
            if r.ok:
                s.add(f"- pass {line}")
            else:
                s.fail(f"- FAIL {line}")


def _layer_kernels(s: Section, t: Target, progress: Progress) -> None:
    from gptlab.testing import check_layer_kernels

    for cls, dtype, label in _runnable(s, t.layer_kernels, t.kernel_request, "layer kernels "):
        progress(f"conformance: layer kernels {cls.name} {dtype_name(dtype)}")
        try:
            results = check_layer_kernels(cls(), device=t.device, dtype=dtype)
        except Exception as e:
            s.fail(f"- FAIL {label}: ({type(e).__name__}) {first_line(e)}")
            continue
        bad = [r for r in results if not r.ok]
        if bad:
            s.fail(f"- FAIL {label}: {len(bad)}/{len(results)} cases")
            s.lines += [f"    - {r}" for r in bad[:10]]
        else:
            worst = max(results, key=lambda r: r.grad_error / r.grad_tol)
            s.add(f"- pass {label}: {len(results)} cases (LayerNorm, linear + GELU, "
                  f"cross-entropy), worst: {worst}")
