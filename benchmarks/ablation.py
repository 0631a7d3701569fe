"""Ablation at equal wall-clock: the default recipe, then each modern component on its own.

Every variant trains the ``default`` preset's model for the same ``--time-budget`` (seconds of
optimiser steps; the learning-rate schedule follows the time used), then ``gpt eval`` scores its
checkpoint on the WHOLE val split. Printed: a markdown table (steps done, mean tokens/s,
whole-split val loss, the change against the baseline) and ``gpt plot`` of every run.

    python benchmarks/ablation.py --budget 240 --out-dir runs/ablation

Runs one variant after another on this machine, so compare rows of one invocation only
(machines differ; a busy machine slows every row alike only if nothing else runs). The tables
of ``benchmarks/results/ablation.md`` were made by this script; rerun it to check.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

#: name -> extra `gpt run` flags (the baseline first)
VARIANTS = {
    "baseline (GPT-2 recipe)": [],
    "rotary": ["--position", "rotary"],
    "rmsnorm": ["--norm", "rmsnorm"],
    "qk-norm": ["--qk-norm"],
    "relu2": ["--mlp", "relu2"],
    "swiglu": ["--mlp", "swiglu"],
    "untied head": ["--untied-head"],
    "zero-init": ["--zero-init"],
    "muon": ["--optimizer", "muon"],
    "wsd schedule": ["--schedule", "wsd"],
    "narrower (C=128), more steps": ["--n-embd", "128", "--n-head", "4"],
}


def gpt(*args: str) -> str:
    """Run ``gpt ARGS`` (this interpreter's gptlab); its stdout, or exit with its error."""
    proc = subprocess.run([sys.executable, "-m", "gptlab", *args], capture_output=True,
                          text=True)
    if proc.returncode:
        sys.exit(f"gpt {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.stdout


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=240.0,
                    help="Seconds of training per variant (default 240).")
    ap.add_argument("--out-dir", default="runs/ablation", help="One run folder per variant.")
    ap.add_argument("--data", default=None, help="Text to train on (default: War and Peace).")
    ap.add_argument("--only", default=None,
                    help="Comma-separated variant slugs to run (default: all), e.g. "
                         "baseline-gpt-2-recipe,rotary.")
    ap.add_argument("--plot", default=None, help="PNG of every run's curves (gpt plot).")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    chosen = {n: f for n, f in VARIANTS.items()
              if args.only is None or slug(n) in args.only.split(",")}
    rows = []
    for i, (name, flags) in enumerate(chosen.items(), 1):
        run = out / slug(name)
        print(f"[{i}/{len(chosen)}] {name}: training {args.budget:g} s ...", file=sys.stderr,
              flush=True)
        t0 = time.perf_counter()
        gpt("run", "--preset", "default", "--time-budget", str(args.budget), "--iters",
            "1000000", "--sample-tokens", "0", "--out-dir", str(run), "--overwrite",
            *(["--data", args.data] if args.data else []), *flags)
        wall = time.perf_counter() - t0
        steps = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()
                 if ln.strip()]
        tps = [r["tokens_per_s"] for r in steps if r.get("kind") == "step" and
               r.get("tokens_per_s")]
        last = max((r["step"] for r in steps if r.get("kind") == "step"), default=0)
        ev = gpt("eval", str(run))
        loss = float(re.search(r"loss ([0-9.]+)", ev).group(1))
        rows.append((name, " ".join(flags) or "-", last, sum(tps) / max(1, len(tps)), loss,
                     wall))
        print(f"    {last} steps, val {loss:.4f} ({wall:.0f} s with the final estimate)",
              file=sys.stderr, flush=True)
    base = rows[0][4] if rows and rows[0][0].startswith("baseline") else None
    print(f"| variant | flags | steps in {args.budget:g} s | tokens/s | val loss (whole split)"
          f" | vs baseline |")
    print("|---|---|---|---|---|---|")
    for name, flags, steps, tps, loss, _ in rows:
        delta = "" if base is None else f"{loss - base:+.4f}"
        print(f"| {name} | `{flags}` | {steps} | {tps:,.0f} | {loss:.4f} | {delta} |")
    if args.plot:
        gpt("plot", *(str(out / slug(n)) for n in chosen), "--out", args.plot)
        print(f"\nplot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
