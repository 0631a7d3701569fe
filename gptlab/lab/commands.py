"""``gpt ladder`` (train the ladder's rungs, print and save its table and plot) and ``gpt
attention`` (draw a trained model's attention weights over a prompt)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from gptlab import console, options
from gptlab.core.errors import GptlabError
from gptlab.lab.ladder import rung_names


def _needs_matplotlib(command: str) -> None:
    """A one-line error before any work if matplotlib (the ``plot`` extra) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise GptlabError(f"{command} draws with matplotlib: pip install 'gptlab[plot]'") \
            from None


@click.command()
@click.option("--rungs", default=None, metavar="A,B",
              help=f"Comma-separated rungs to train, of {', '.join(rung_names())} (default: "
                   f"every one, in that order).")
@click.option("--budget", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS",
              help="Seconds of optimiser steps per rung (the learning-rate schedule follows "
                   "the time used).")
@click.option("--iters", type=click.IntRange(min=1), default=None,
              help="Optimiser steps per rung, instead of --budget (default: 400).")
@click.option("--out-dir", default="runs/ladder", show_default=True,
              type=click.Path(file_okay=False),
              help="One run folder per rung, the table (ladder.md) and the plot (ladder.png).")
@options.data_option("Text to train on. Default: War and Peace.")
@options.device_option()
@click.option("--sample-chars", type=click.IntRange(min=0), default=80, show_default=True,
              help="Characters each rung samples for the table.")
@options.pass_registry
def ladder(reg, rungs, budget, iters, out_dir, data, device, sample_chars):
    """Train the ladder from the bigram to GPT, one part per rung, on one budget per rung.

    Each rung adds one part to the rung before (a head, many heads, an MLP, residual
    connections, LayerNorm, scale; then the attention kernels and the speedrun's parts) and
    trains in its own run folder under --out-dir with the same seed and batches; each is
    scored on the whole val split (as `gpt eval`). The table is printed and saved as
    ladder.md, the plot as ladder.png. A rerun skips finished rungs and resumes an
    interrupted one; Ctrl-C saves the rung's checkpoint first, as `gpt run` does.
    """
    from gptlab.core.files import atomic_write
    from gptlab.lab import ladder as lad
    from gptlab.plot import plot_ladder

    if budget is not None and iters is not None:
        raise click.UsageError("give --budget or --iters, not both")
    chosen = lad.choose(rungs)
    spend = lad.Budget(seconds=budget or 0.0, iters=0 if budget else (iters or 400))
    _needs_matplotlib("gpt ladder")
    out = Path(out_dir)
    for rung in chosen:  # a folder holding other settings: refused before anything trains
        lad.check_folder(rung, spend, out, device=device)
    click.echo(f"{len(chosen)} rungs, {spend.describe()}, in {out}; {lad.machine()}", err=True)
    results = []
    for i, rung in enumerate(chosen, 1):
        _, tc = rung.configs(spend, device=device)
        click.echo(f"[{i}/{len(chosen)}] {rung.name}: {rung.adds}", err=True)
        stage = _Stages(rung.name, tc.max_iters, tc.time_budget)
        try:
            result = lad.run_rung(reg, rung, spend, out, data=data, device=device,
                                  sample_chars=sample_chars, on_event=stage.event,
                                  on_stage=stage)
        finally:
            stage.close()
        results.append(result)
        click.echo(f"    {result.steps:,} steps, {result.tokens_per_s:,.0f} tok/s, val loss "
                   f"{result.val_loss:.4f} (whole split)", err=True)
    table = lad.markdown_table(results)
    click.echo(table, nl=False)
    command = options.command_line(click.get_current_context())
    atomic_write(out / lad.TABLE, f"`{command}`: {spend.describe()}; val "
                                  f"loss over the whole val split. {lad.machine()}.\n\n{table}")
    plot_ladder([r.rung for r in results], [r.val_loss for r in results],
                [out / r.rung for r in results], out / lad.PLOT)
    click.echo(f"wrote {out / lad.TABLE} and {out / lad.PLOT}")


class _Stages:
    """Shows a rung's stages: training progress, skipped, resumed, scoring the val split."""

    def __init__(self, name: str, max_iters: int, budget: float):
        self.name, self.max_iters, self.budget = name, max_iters, budget
        self.progress: console.TrainingProgress | None = None  # from the first step on
        self.bar, self.done = None, 0

    def event(self, ev) -> None:
        """A training event (:class:`~gptlab.core.trainer.TrainEvent`)."""
        if self.progress is None:
            self.progress = console.TrainingProgress(self.max_iters, self.budget)
        self.progress(ev)

    def __call__(self, what: str, value) -> None:
        if what == "skipped":
            click.echo(f"    finished before: skipped (move {self.name}/rung.json away to "
                       f"score it again)", err=True)
        elif what == "resumed":
            click.echo(f"    resuming at step {value}", err=True)
        elif what == "trainer":
            for note in value.notes:
                click.echo(f"    note: {note}", err=True)
        elif what == "scoring":
            done, total = value
            if self.bar is None:
                self._end_training()
                self.bar = click.progressbar(length=total, label="    scoring the val split",
                                             file=sys.stderr)
                self.bar.__enter__()
            self.bar.update(done - self.done)
            self.done = done

    def _end_training(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def close(self) -> None:
        self._end_training()
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@click.command()
@options.checkpoint_argument
@click.option("--prompt", required=True,
              help="Text whose characters the heads attend over (at most the model's block "
                   "size; every character in its vocabulary).")
@click.option("--out", "out_path", default="attn.png", show_default=True,
              type=click.Path(dir_okay=False), help="Image to write (its suffix names the format: .png, .pdf, .svg).")
@options.pass_registry
def attention(reg, checkpoint, prompt, out_path):
    """Draw each layer's and head's attention weights over --prompt from a CHECKPOINT (a run
    folder or a .pt file; default: out), one heatmap per head.

    The weights are recomputed from the q and k each attention module computes (after its
    position seam) with the written-out formula softmax(q k^T / sqrt(head_dim) + causal
    mask), whatever backend the run trained with. Row i is where character i looks."""
    from gptlab.core.checkpoint import load_model
    from gptlab.lab.attention_maps import attention_maps
    from gptlab.plot import plot_attention

    _needs_matplotlib("gpt attention")
    model, tokenizer, _ = load_model(reg, checkpoint)
    found = attention_maps(model, tokenizer, prompt)
    path = plot_attention(found.tokens, found.names, [m.tolist() for m in found.maps],
                          out_path, title=f"{checkpoint}: attention weights over {prompt!r}")
    heads = sum(len(m) for m in found.maps)
    click.echo(f"wrote {path}: {len(found.maps)} layer(s), {heads} head(s) over "
               f"{len(found.tokens)} characters")
