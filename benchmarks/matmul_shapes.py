"""GFLOP/s of each matrix product of a Linear layer, through each ``--matmul`` implementation's
own call, on a model's shapes: the forward ``x W^T + b``, the input gradient ``dy W`` and the
weight gradient ``dy^T x``, in interleaved rounds (median), float32 on the CPU.

    python benchmarks/matmul_shapes.py                      # the default preset: C=192, 4096 rows
    python benchmarks/matmul_shapes.py --n-embd 384 --rows 8192 --rounds 9

``torch`` is what ``F.linear`` and its autograd run (MKL's sgemm on x86); ``onednn`` is what
:class:`gptlab.plugins.matmuls.OneDNNMatmul` runs (oneDNN for the forward and the input
gradient, torch's ``mm`` for the weight gradient, where both are shown).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, repeat: int = 10) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - start)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-embd", type=int, default=192)
    ap.add_argument("--rows", type=int, default=4096, help="tokens per call (batch x block)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    lp = torch.ops.mkldnn._linear_pointwise
    C, M = args.n_embd, args.rows
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, {M} rows; GFLOP/s, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'in x out':<12}{'product':<10}{'torch':>8}{'onednn':>8}{'ratio':>8}")
    g = torch.Generator().manual_seed(0)
    for n_in, n_out in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)):
        x, w = torch.randn(M, n_in, generator=g), torch.randn(n_out, n_in, generator=g)
        b, dy = torch.randn(n_out, generator=g), torch.randn(M, n_out, generator=g)
        calls = {
            "forward": (lambda: torch.addmm(b, x, w.t()), lambda: lp(x, w, b, "none", [], "")),
            "dx": (lambda: dy.mm(w), lambda: lp(dy, w.t(), None, "none", [], "")),
            "dw": (lambda: dy.t().mm(x), lambda: lp(dy.t(), x.t(), None, "none", [], "")),
        }
        flops = 2 * M * n_in * n_out
        for product, pair in calls.items():
            times = [[], []]
            for _ in range(args.rounds):
                for i, fn in enumerate(pair):
                    times[i].append(timed(fn))
            rate = [flops / statistics.median(t) / 1e9 for t in times]
            print(f"{f'{n_in} x {n_out}':<12}{product:<10}{rate[0]:>8.1f}{rate[1]:>8.1f}"
                  f"{rate[1] / rate[0]:>8.2f}")


if __name__ == "__main__":
    main()
