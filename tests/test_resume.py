"""Checkpoints during training: bit-exact resume, Ctrl-C, SIGKILL mid-save, best/latest, logs,
whole-split evaluation, plots."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from gptlab.cli import build_cli
from gptlab.core.checkpoint import load_checkpoint, load_model
from gptlab.core.config import ModelConfig, TrainConfig
from gptlab.core.evaluation import evaluate_split
from gptlab.core.trainer import TrainingInterrupted, train

TEXT = ("Prince Vasili always spoke languidly, like an actor repeating a stale part. "
        "Anna Pavlovna Scherer on the contrary, despite her forty years, overflowed with "
        "animation and impulsiveness. ") * 25
MC = ModelConfig(block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1)
TC = TrainConfig(max_iters=30, batch_size=4, eval_interval=5, eval_iters=2,
                 final_eval_iters=2, seed=7, warmup_iters=3)


def step_losses(events):
    return {e.step: e.loss for e in events if e.kind == "step"}


MC_PARTS = ModelConfig(**{**MC.to_dict(), "norm": "rmsnorm", "mlp": "swiglu",
                          "position": "rotary", "qk_norm": True, "untied_head": True,
                          "zero_init": True})


@pytest.mark.parametrize("mc, tc", [(MC, TC), (MC_PARTS, TC),
                                    (MC, TrainConfig(**{**TC.to_dict(), "optimizer": "muon"}))],
                         ids=["gpt2", "parts", "muon"])
def test_resume_is_bit_exact_and_ctrl_c_saves_first(registry, tmp_path, mc, tc):
    MC, TC = mc, tc  # noqa: N806 (the module's configs, or with the swappable parts changed)
    full_events = []
    full = train(registry, MC, TC, TEXT, out_dir=tmp_path / "full", on_event=full_events.append)

    part_events = []

    def ctrl_c_at_12(event):  # a real SIGINT in the middle of training
        part_events.append(event)
        if event.kind == "step" and event.step == 12:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="interrupted after step 12") as e:
        train(registry, MC, TC, TEXT, out_dir=tmp_path / "part", on_event=ctrl_c_at_12)
    assert e.value.checkpoint == tmp_path / "part" / "ckpt.pt"
    assert load_checkpoint(tmp_path / "part").train_state.step == 12

    rest_events = []
    resumed = train(registry, MC, TC, TEXT, out_dir=tmp_path / "part",
                    resume=load_checkpoint(tmp_path / "part"), on_event=rest_events.append)
    got = {**step_losses(part_events), **step_losses(rest_events)}
    assert min(step_losses(rest_events)) == 13
    assert got == step_losses(full_events)  # exactly equal floats, every step
    assert resumed.val_loss == full.val_loss
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    # metrics log: no duplicated steps after the resume, ends at the last step
    recs = [json.loads(ln) for ln in (tmp_path / "part" / "metrics.jsonl").read_text()
            .splitlines()]
    steps = [(r["kind"], r["step"]) for r in recs]
    assert len(steps) == len(set(steps))
    assert recs[-1]["kind"] == "eval" and recs[-1]["step"] == 30
    first_step = next(r for r in recs if r["kind"] == "step")
    assert {"step", "train_loss", "lr", "tokens_per_s", "elapsed"} <= set(first_step)
    first_eval = next(r for r in recs if r["kind"] == "eval")
    assert {"step", "train_loss", "val_loss", "lr", "elapsed"} <= set(first_eval)


def test_best_and_latest(registry, tmp_path):
    res = train(registry, MC, TC, TEXT, out_dir=tmp_path)
    latest, best = load_checkpoint(tmp_path / "ckpt.pt"), load_checkpoint(tmp_path / "best.pt")
    assert latest.train_state.step == 30
    vals = [h["val_loss"] for h in res.history]
    assert best.metrics["val_loss"] == min(vals)
    assert latest.train_state.best_val == min(vals)


def test_sigkill_mid_save_leaves_previous_checkpoint_loadable(registry, tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch
        from gptlab.core.files import atomic_write
        big = torch.randn(4_000_000)
        for i in range(1000):
            print("saving", i, flush=True)
            atomic_write({str(tmp_path / "ckpt.pt")!r},
                         lambda f: torch.save({{"i": i, "w": big}}, f))
    """)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        while proc.stdout.readline().strip() != "saving 2":  # killed during the third save
            pass
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        assert ck["i"] >= 1 and ck["w"].numel() == 4_000_000
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt.pt" and
                not p.name.endswith(".tmp")]


def test_evaluate_split_covers_every_token_once(registry):
    from gptlab.core.planning import build_model

    torch.manual_seed(0)
    model = build_model(registry, ModelConfig(vocab_size=7, block_size=8, n_layer=1, n_head=1,
                                              n_embd=8)).eval()
    ids = torch.randint(0, 7, (43,))
    loss, count = evaluate_split(model, ids, batch_size=2)
    assert count == 42
    total = 0.0
    for s in range(0, 42, 8):
        x, y = ids[s:min(s + 8, 42)], ids[s + 1:min(s + 9, 43)]
        total += F.cross_entropy(model(x[None])[0][0], y, reduction="sum").item()
    assert loss == pytest.approx(total / 42, rel=1e-6)
    assert evaluate_split(model, ids, batch_size=5) == pytest.approx((loss, 42))


def test_cli_resume_eval_plot(registry, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    cli = build_cli(registry)
    run = tmp_path / "run"
    args = ["run", "--preset", "tiny", "--data", str(data), "--iters", "20", "--block-size",
            "16", "--eval-interval", "10", "--sample-tokens", "0", "--out-dir", str(run)]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["run", "--resume", str(run), "--iters", "5"])
    assert r.exit_code == 2 and "drop --iters" in r.output
    r = CliRunner().invoke(cli, ["run", "--resume", str(run)], catch_exceptions=False)
    assert r.exit_code == 0 and "is finished (step 20/20" in r.output  # nothing to resume

    r = CliRunner().invoke(cli, ["eval", str(run)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    line = r.output.strip().splitlines()[-1]
    loss, ppl, bpc = (float(part.split()[-1]) for part in line.split("|"))
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3)
    assert bpc == pytest.approx(loss / math.log(2), rel=1e-3)  # char tokenizer: 1 token = 1 char

    png = tmp_path / "loss.png"
    r = CliRunner().invoke(cli, ["plot", str(run), str(run), "--out", str(png)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch, registry):
    import builtins

    real_import = builtins.__import__

    def no_mpl(name, *a, **kw):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **kw)

    (tmp_path / "metrics.jsonl").write_text('{"kind": "eval", "step": 1}\n')
    monkeypatch.setattr(builtins, "__import__", no_mpl)
    r = CliRunner().invoke(build_cli(registry), ["plot", str(tmp_path)])
    assert r.exit_code == 1
    assert r.output.strip() == "Error: gpt plot needs matplotlib: pip install 'gptlab[plot]'"


def test_foreign_and_truncated_checkpoints_name_the_file(registry, tmp_path):
    p = tmp_path / "ckpt.pt"
    p.write_bytes(b"not a checkpoint at all")
    with pytest.raises(Exception, match=str(p)):
        load_model(registry, p)
