"""Loss curves of one or more runs (their ``metrics.jsonl``) drawn into an image.

The image's format is the one its suffix names (``.png``, ``.pdf``, ``.svg``, ... whatever
matplotlib writes; no suffix: PNG); a suffix it cannot write, or a folder it cannot write into,
is a one-line error before anything is drawn. matplotlib is an optional extra (``pip install
'gptlab[plot]'``); without it a clear error says so.
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
    out = Path(out_path)
    kinds = fig.canvas.get_supported_filetypes()
    fmt = out.suffix[1:].lower() or "png"
    if fmt not in kinds:
        plt.close(fig)
        raise GptlabError(f"gpt plot cannot write {out.suffix!r} files ({out}); give --out one "
                          f"of: {', '.join('.' + k for k in sorted(kinds))}")
    blocker = next((p for p in out.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        plt.close(fig)
        raise GptlabError(f"cannot write {out}: {blocker} is a file, not a folder; pick another "
                          f"--out")
    runs = [read_metrics(run_dir) for run_dir in run_dirs]  # every record checked first
    for i, (run_dir, recs) in enumerate(zip(run_dirs, runs)):
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
    fig.tight_layout()
    try:
        atomic_write(out, lambda f: fig.savefig(f, format=fmt))
    except OSError as e:
        raise GptlabError(f"cannot write {out}: {e.strerror}; pick another --out") from None
    finally:
        plt.close(fig)
    return out
