"""Where a training step's time goes: torch.profiler's self CPU time by op over a few steps of a
preset, after a warm-up, as a table (op, calls, self ms, share of the step).

    python benchmarks/profile_step.py                       # the default preset, --dtype float32
    python benchmarks/profile_step.py --dtype bfloat16 --steps 5 --top 30
    python benchmarks/profile_step.py --set attention=sdpa --set kernels=torch

The native kernels run inside the ops that call them (``gptlab::*`` custom ops, or the
``Fn``/``FnBackward`` autograd functions of their eager path): their self time is the kernels'
own work, not Python overhead.
"""

from __future__ import annotations

import argparse
import ast
import os

import torch
from torch.profiler import ProfilerActivity, profile


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a ModelConfig or TrainConfig field, e.g. attention=sdpa")
    args = ap.parse_args()
    os.environ.setdefault("GPTLAB_AUTO", "priority")

    from gptlab.core.config import resolve_configs, split_overrides
    from gptlab.core.plugins import load_registry
    from gptlab.core.trainer import Trainer
    from gptlab.data.corpora import load_text, resolve_corpus

    settings = {"dtype": args.dtype, "max_iters": args.warmup + args.steps + 1}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            settings[key] = ast.literal_eval(value)  # numbers, True/False
        except (ValueError, SyntaxError):
            settings[key] = value  # names
    model_over, train_over = split_overrides(settings)
    mc, tc = resolve_configs(args.preset, model_over, train_over)
    trainer = Trainer(load_registry(), mc, tc, load_text(resolve_corpus(None)))
    for _ in range(args.warmup):
        trainer.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            trainer.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{args.preset} preset, {args.dtype}, attention {trainer.plan.attention_name}, kernels "
          f"{trainer.plan.kernels_name}, {torch.get_num_threads()} threads: {args.steps} steps, "
          f"{total / 1e3 / args.steps:.1f} ms of self CPU time per step")
    print(f"{'op':<44}{'calls':>7}{'self ms':>10}{'share':>8}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"{e.key[:43]:<44}{e.count:>7}{e.self_cpu_time_total / 1e3:>10.1f}"
              f"{e.self_cpu_time_total / total:>8.1%}")


if __name__ == "__main__":
    main()
