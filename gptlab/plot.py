"""Drawings into image files: the loss curves of runs (their ``metrics.jsonl``), the ladder's
val loss per rung, the attention benchmark's time and memory per sequence length, and
attention maps.

An image's format is the one its suffix names (``.png``, ``.pdf``, ``.svg``, ... whatever
matplotlib writes; no suffix: PNG); a suffix it cannot write, or a folder it cannot write into,
is a one-line error before anything is drawn. matplotlib is an optional extra (``pip install
'gptlab[plot]'``); without it a clear error says so. Torch-free: callers pass plain numbers.
"""

from __future__ import annotations

from pathlib import Path

from gptlab.core.errors import GptlabError
from gptlab.core.files import atomic_write
from gptlab.core.runs import read_metrics


def _pyplot(command: str = "gpt plot"):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GptlabError(f"{command} needs matplotlib: pip install 'gptlab[plot]'") from None
    return plt


def _color(i: int) -> str:
    """Matplotlib's ten colours, then darker ones: a line or bar each for up to 16 runs."""
    more = ["black", "dimgray", "darkgoldenrod", "darkslateblue", "darkred", "teal"]
    return f"C{i}" if i < 10 else more[(i - 10) % len(more)]


def _checked(out_path, command: str) -> tuple[Path, str]:
    """The output path and its format, refused before anything is drawn: a suffix matplotlib
    cannot write, or a parent that is a file."""
    from matplotlib.backend_bases import FigureCanvasBase

    out = Path(out_path)
    kinds = FigureCanvasBase.get_supported_filetypes()
    fmt = out.suffix[1:].lower() or "png"
    if fmt not in kinds:
        raise GptlabError(f"{command} cannot write {out.suffix!r} files ({out}); give --out one "
                          f"of: {', '.join('.' + k for k in sorted(kinds))}")
    blocker = next((p for p in out.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise GptlabError(f"cannot write {out}: {blocker} is a file, not a folder; pick another "
                          f"--out")
    return out, fmt


def _save(fig, plt, out: Path, fmt: str, top: float = 1.0) -> Path:
    fig.tight_layout(rect=(0, 0, 1, top))  # top < 1: room for a title over every subplot
    try:
        atomic_write(out, lambda f: fig.savefig(f, format=fmt))
    except OSError as e:
        raise GptlabError(f"cannot write {out}: {e.strerror}; pick another --out") from None
    finally:
        plt.close(fig)
    return out


def plot_runs(run_dirs, out_path: str | Path) -> Path:
    plt = _pyplot()
    out, fmt = _checked(out_path, "gpt plot")
    runs = [read_metrics(run_dir) for run_dir in run_dirs]  # every record checked first
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
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
    return _save(fig, plt, out, fmt)


def plot_ladder(names, val_losses, run_dirs, out_path: str | Path) -> Path:
    """The ladder: each rung's whole-split val loss (left, the first rung's as a dashed line),
    and each rung's training loss as it trained (right, from its ``metrics.jsonl``)."""
    plt = _pyplot("gpt ladder")
    out, fmt = _checked(out_path, "gpt ladder")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), dpi=110)
    xs = range(len(names))
    left.bar(xs, val_losses, color=[_color(i) for i in xs])
    for x, v in zip(xs, val_losses):
        left.text(x, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    left.set_xticks(list(xs), names, rotation=30, ha="right")
    left.set_ylim(min(val_losses) * 0.9 if val_losses else 0, max(val_losses, default=1) * 1.05)
    if val_losses:
        left.axhline(val_losses[0], color=_color(0), ls="--", lw=1)
    left.set_ylabel("val loss, whole split (nats/char)")
    left.set_title("one part per rung")
    left.grid(alpha=0.3, axis="y")
    for i, (name, run_dir) in enumerate(zip(names, run_dirs)):
        steps = [r for r in read_metrics(run_dir) if r.get("kind") == "step"]
        if steps:
            right.plot([r["step"] for r in steps], [r["train_loss"] for r in steps],
                       color=_color(i), lw=1, label=name)
    right.set_xlabel("step")
    right.set_ylabel("training loss (a batch, every 10 steps)")
    right.set_ylim(top=4.8)
    right.set_title("while training")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    return _save(fig, plt, out, fmt)


def _label(token: str) -> str:
    return {" ": "␣", "\n": "⏎", "\t": "⇥"}.get(token, token)


def plot_attention(tokens, names, maps, out_path: str | Path, title: str = "") -> Path:
    """One heatmap per head (a row of heads per layer): ``maps[layer][head][query][key]``, the
    weight query ``i`` puts on key ``j``; ``tokens`` label both axes."""
    plt = _pyplot("gpt attention")
    out, fmt = _checked(out_path, "gpt attention")
    rows, cols = len(maps), max(len(m) for m in maps)
    T = len(tokens)
    size = max(2.2, min(6.0, 0.12 * T + 1.2))
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + 0.6), dpi=100,
                             squeeze=False)
    labels = [_label(t) for t in tokens]
    fontsize = max(4, min(9, int(260 / max(T, 1))))
    for layer, (name, heads) in enumerate(zip(names, maps)):
        for h in range(cols):
            ax = axes[layer][h]
            if h >= len(heads):
                ax.axis("off")
                continue
            ax.imshow(heads[h], cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"{name} head {h}", fontsize=8)
            ax.set_xticks(range(T), labels, fontsize=fontsize)
            ax.set_yticks(range(T), labels, fontsize=fontsize)
            ax.tick_params(length=0)
            if h == 0:
                ax.set_ylabel("query (this character)", fontsize=8)
            if layer == rows - 1:
                ax.set_xlabel("key (the character it looks at)", fontsize=8)
    fig.suptitle(title or "attention weights: softmax(q k^T / sqrt(head_dim) + causal mask)",
                 fontsize=10)
    return _save(fig, plt, out, fmt, top=1 - 0.5 / fig.get_figheight())


def plot_attention_bench(points, out_path: str | Path, title: str = "") -> Path:
    """``gpt bench attention``'s points (dicts with ``backend``, ``T``, ``time_ms``,
    ``peak_extra_mib``): time (left) and peak extra memory (right) against T, log-log."""
    plt = _pyplot("gpt bench attention --plot")
    out, fmt = _checked(out_path, "gpt bench attention --plot")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    backends = list(dict.fromkeys(p["backend"] for p in points))
    for i, name in enumerate(backends):
        mine = sorted((p for p in points if p["backend"] == name), key=lambda p: p["T"])
        ts = [p["T"] for p in mine]
        left.plot(ts, [p["time_ms"] for p in mine], marker="o", color=_color(i), label=name)
        mem = [(p["T"], p["peak_extra_mib"]) for p in mine if p["peak_extra_mib"] is not None]
        if mem:
            right.plot(*zip(*mem), marker="o", color=_color(i), label=name)
    for ax, what in ((left, "forward+backward time (ms)"), (right, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title or "gpt bench attention", fontsize=10)
    return _save(fig, plt, out, fmt, top=0.93)
