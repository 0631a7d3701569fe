"""The CPU flash kernel of two or more git revisions, side by side: forward and backward time at
one shape, in interleaved rounds, with the ratio to the first revision and how far each one's
outputs are from the first's. For a change to ``csrc/cpu/flash.c``, measured the way the model
calls it (q, k, v strided views of one (B, T, 3C) projection; dq, dk, dv written into one), with
the inputs evicted from the cache before each call, as the projection before it does in a step.

    python benchmarks/flash_ab.py main .              # the last commit against the working tree
    python benchmarks/flash_ab.py 3608765 HEAD --rounds 50 --shape 8,4,1024,64

Each revision's ``csrc/cpu/*.c`` is compiled with the cpu flavour's flags (``GPTLAB_CPU_MARCH``
applies) into a temporary folder and loaded with ctypes; every library runs in this one process,
one call at a time. A round times each library once; the figure is the median over the rounds,
and the ratio the median of the per-round ratios (the machine's drift cancels within a round).
``gpt bench attention`` measures each backend in a process of its own, one after the other: it
is the comparison with sdpa, not between two builds of one kernel.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptlab.plugins.cuda_kernels import build

ROOT = Path(__file__).resolve().parents[1]
CSRC = "gptlab/plugins/cuda_kernels/csrc"


def compile_revision(rev: str, into: Path) -> Path:
    """The cpu library of ``rev`` ("." = the working tree), compiled under ``into``."""
    src = ROOT / CSRC
    into.mkdir(parents=True)
    if rev != ".":
        tree = into / "tree"
        tree.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, CSRC],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        src = tree / CSRC
    lib = into / "libgptlab_cpu.so"
    sources = sorted(str(p) for p in (src / "cpu").glob("*.c"))
    subprocess.run([build.CPU.compiler(), *build.CPU.all_flags(), "-I", str(src), "-o", str(lib),
                    *sources, "-lm"], check=True, capture_output=True)
    return lib


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("revs", nargs="+", help="git revisions; '.' is the working tree")
    ap.add_argument("--shape", default="32,6,128,32", help="B,H,T,D (default: the default "
                    "preset's attention)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-evict", action="store_true", help="keep the inputs in the cache")
    args = ap.parse_args()
    try:
        B, H, T, D = (int(x) for x in args.shape.split(","))
    except ValueError:
        ap.error(f"--shape {args.shape!r}: expected four integers B,H,T,D, e.g. 32,6,128,32")
    C = H * D

    V, I64, F, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    libs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, rev in enumerate(args.revs):
            try:
                lib = ctypes.CDLL(str(compile_revision(rev, Path(tmp) / str(i))))
            except subprocess.CalledProcessError as e:
                why = (e.stderr or b"").decode(errors="replace").strip().splitlines()
                sys.exit(f"{rev}: {why[-1] if why else e}")
            lib.gptlab_flash_forward_f32.argtypes = [V] * 6 + [I64] * 5 + [F, I, V, I]
            lib.gptlab_flash_backward_f32.argtypes = [V] * 11 + [I64] * 5 + [F, I, V, I]
            libs.append(lib)

    torch.manual_seed(0)
    qkv = torch.randn(B, T, 3 * C)
    q, k, v = (qkv[..., i * C:(i + 1) * C].view(B, T, H, D).transpose(1, 2) for i in range(3))
    o = torch.empty(B, T, H, D).transpose(1, 2)  # heads last, as the model concatenates them
    lse = torch.empty(B * H, T)
    do = torch.randn(B, T, H, D).transpose(1, 2)
    dqkv = torch.empty(B, T, 3, H, D)  # the projection's gradient, as the packed backward writes
    dq, dk, dv = (dqkv[:, :, i].transpose(1, 2) for i in range(3))
    ws = torch.empty(3 * B * H * T)
    other = torch.empty(64 << 18)  # 64 MiB written before each call: the inputs leave the cache

    def ptr(t):
        return ctypes.c_void_p(t.data_ptr())

    def strides(*ts):
        return (ctypes.c_int64 * (3 * len(ts)))(*[s for t in ts for s in t.stride()[:3]])

    sf, sb, scale = strides(q, k, v, o), strides(q, k, v, o, do, dq, dk, dv), F(D ** -0.5)
    calls = {
        "forward": lambda lib: lib.gptlab_flash_forward_f32(
            ptr(o), ptr(lse), ptr(q), ptr(k), ptr(v), sf, B, H, T, T, D, scale, 1, None,
            args.threads),
        "backward": lambda lib: lib.gptlab_flash_backward_f32(
            ptr(dq), ptr(dk), ptr(dv), ptr(ws), ptr(q), ptr(k), ptr(v), ptr(o), ptr(lse),
            ptr(do), sb, B, H, T, T, D, scale, 1, None, args.threads),
    }
    times = {(i, what): [] for i in range(len(libs)) for what in calls}
    outputs = {}
    for r in range(args.rounds + 2):  # the first two rounds warm up
        for i, lib in enumerate(libs):
            for what, call in calls.items():
                if what == "backward":  # every library's backward reads the same o and lse
                    calls["forward"](libs[0])
                if not args.no_evict:
                    other.fill_(1.0)
                start = time.perf_counter()
                if call(lib) != 0:
                    sys.exit(f"{args.revs[i]}: the {what} kernel failed")
                if r >= 2:
                    times[(i, what)].append(time.perf_counter() - start)
                if r == 0:
                    outputs[(i, what)] = o.clone() if what == "forward" else dqkv.clone()

    print(f"flash attention, causal, B={B} H={H} T={T} D={D}, float32, {args.threads} threads, "
          f"{args.rounds} interleaved rounds{'' if args.no_evict else ', inputs out of cache'}")
    print(f"{'revision':<14}{'forward ms':>11}{'x first':>9}{'backward ms':>13}{'x first':>9}"
          f"{'max |diff|':>12}")
    for i, rev in enumerate(args.revs):
        row = f"{rev:<14}"
        for what in calls:
            ratio = statistics.median(a / b for a, b in zip(times[(i, what)], times[(0, what)]))
            width = 11 if what == "forward" else 13
            row += f"{statistics.median(times[(i, what)]) * 1e3:>{width}.2f}{ratio:>9.3f}"
        diff = max(float((outputs[(i, w)] - outputs[(0, w)]).abs().max()) for w in calls)
        print(row + f"{diff:>12.1e}")


if __name__ == "__main__":
    main()
