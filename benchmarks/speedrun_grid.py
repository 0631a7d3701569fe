"""The speedrun preset's tuning grid: candidates compared at equal compute, by step count.

Each candidate (the speedrun preset with some fields changed) first has its step time measured
alone (``--time-steps`` steps after 3 warm-up steps, at the machine's thread count); it then
trains for the number of steps that fit ``--budget`` seconds at that speed, as a plain step
count, so a busy machine changes how long the grid takes but not its result. Printed: a
markdown table of the val split's random-batch estimate after training (what the choice is made
on; the preset's ``final_eval_iters`` batches) and, with ``--whole``, the whole split.

    python benchmarks/speedrun_grid.py --budget 453 --threads 1

``--threads 1`` with two invocations side by side (``--only``) is how the table of
``benchmarks/results/speedrun-grid.md`` was run on two cores. Step times vary ~10-15% between measurements on a shared machine; the steps
column says what each candidate got.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

#: name -> (model overrides, train overrides) on top of the speedrun preset
BASE_TRAIN = dict(schedule="wsd", warmdown=0.4, min_lr_ratio=0.0, learning_rate=8e-3)
CANDIDATES = {
    "C=192 cosine lr 2e-3": (dict(n_embd=192, n_head=6),
                             dict(schedule="cosine", min_lr_ratio=0.1, learning_rate=2e-3)),
    "C=192 wsd lr 2e-3": (dict(n_embd=192, n_head=6), dict(learning_rate=2e-3)),
    "C=192 wsd": (dict(n_embd=192, n_head=6), {}),
    "C=192 T=256 batch 16": (dict(n_embd=192, n_head=6, block_size=256), dict(batch_size=16)),
    "C=128": (dict(n_embd=128, n_head=4), {}),
    "C=128 batch 16": (dict(n_embd=128, n_head=4), dict(batch_size=16)),
    "C=96": (dict(n_embd=96, n_head=3), {}),
    "C=96 6 layers": (dict(n_embd=96, n_head=3, n_layer=6), {}),
    "C=64": (dict(n_embd=64, n_head=2), {}),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=453.0,
                    help="Seconds of steps (at the measured step time) per candidate.")
    ap.add_argument("--time-steps", type=int, default=15, help="Steps timed per candidate.")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all).")
    ap.add_argument("--only", default=None, help="Comma-separated candidate names.")
    ap.add_argument("--whole", action="store_true", help="Also score the whole val split.")
    ap.add_argument("--data", default=None, help="Text to train on (default: War and Peace).")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from gptlab.core.config import resolve_configs
    from gptlab.core.evaluation import evaluate_split
    from gptlab.core.plugins import load_registry
    from gptlab.core.trainer import Trainer
    from gptlab.data.corpora import load_text, resolve_corpus

    reg, text = load_registry(), load_text(resolve_corpus(args.data))
    chosen = {n: c for n, c in CANDIDATES.items()
              if args.only is None or n in args.only.split(",")}
    print("| candidate | steps | step time (s) | val estimate |" + (" whole split |" * args.whole))
    print("|---|---|---|---|" + "---|" * args.whole)
    for name, (model_over, train_over) in chosen.items():
        train_over = {**BASE_TRAIN, **train_over, "time_budget": 0.0, "eval_interval": 10**6}
        mc, tc = resolve_configs("speedrun", model_over, train_over)
        probe = Trainer(reg, mc, tc, text)
        for _ in range(3):
            probe.step()
        t0 = time.perf_counter()
        for _ in range(args.time_steps):
            probe.step()
        step_s = (time.perf_counter() - t0) / args.time_steps
        steps = max(1, round(args.budget / step_s))
        mc, tc = resolve_configs("speedrun", model_over, {**train_over, "max_iters": steps})
        trainer = Trainer(reg, mc, tc, text)
        result = trainer.fit()
        row = f"| {name} | {steps} | {step_s:.3f} | {result.val_loss:.4f} |"
        if args.whole:
            with torch.no_grad():
                row += f" {evaluate_split(result.model, trainer.splits.val)[0]:.4f} |"
        print(row, flush=True)
        print(json.dumps({"candidate": name, "steps": steps, "val": result.val_loss}),
              file=sys.stderr)


if __name__ == "__main__":
    main()
