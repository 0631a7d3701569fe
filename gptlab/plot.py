"""Loss curves of one or more runs (their ``metrics.jsonl``) drawn into a PNG.

matplotlib is an optional extra (``pip install 'gptlab[plot]'``); without it a clear error says
so.
"""

from __future__ import annotations

from pathlib import Path

from gptlab.core.errors import GptlabError
from gptlab.core.files import atomic_write
from gptlab.core.runs import read_metrics


def plot_runs(run_dirs, out_path: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GptlabError("gpt plot needs matplotlib: pip install 'gptlab[plot]'") from None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for i, run_dir in enumerate(run_dirs):
        recs = read_metrics(run_dir)
        color = f"C{i}"
        name = Path(run_dir).resolve().name
        steps = [r for r in recs if r.get("kind") == "step"]
        evals = [r for r in recs if r.get("kind") == "eval"]
        if steps:
            ax.plot([r["step"] for r in steps], [r["train_loss"] for r in steps], color=color,
                    alpha=0.25, lw=1, label=f"{name} train (batch)")
        if evals:
            ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], color=color,
                    ls="--", marker=".", label=f"{name} train")
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], color=color,
                    marker="o", label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title("gptlab: loss curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(out_path)
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return out
