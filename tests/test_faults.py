"""Bad inputs and faults (issue: "lose nothing, explain everything"): run folders, NaN, signals,
data integrity, option validation, memory, disk. Each case asserts the exact one-line error and
that the files that existed before are unchanged. (Kernel-cache faults: tests/kernels/
test_cache_faults.py; plugin faults: tests/test_plugin_faults.py.)"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import gptlab
from gptlab.core.checkpoint import load_checkpoint, save_checkpoint
from gptlab.core.config import ModelConfig, TrainConfig
from gptlab.core.errors import first_line
from gptlab.core.trainer import Trainer, TrainingInterrupted
from conftest import SMALL, TEXT, error_line, gpt

@pytest.fixture
def data(tmp_path):
    p = tmp_path / "small.txt"
    p.write_text(TEXT)
    return p


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


def unfinish(run_dir: Path) -> None:
    """Make a finished run one stopped during its final evaluation (saved at its last step,
    that evaluation still to do), so that --resume has something left to do."""
    ckpt = load_checkpoint(run_dir)
    ckpt.train_state.history.pop()
    save_checkpoint(run_dir / "ckpt.pt", ckpt)


@pytest.fixture
def run_dir(cli, data, tmp_path):
    """A finished small run (20 steps)."""
    out = tmp_path / "run"
    r = gpt(cli, "run", *SMALL, "--data", data, "--iters", "20", "--eval-interval", "10",
            "--out-dir", out)
    assert r.exit_code == 0, r.output
    return out


# ------------------------------------------------------------------ run folders
def test_a_folder_holding_a_run_is_refused_then_overwritten_on_request(cli, data, run_dir):
    before = snapshot(run_dir)
    r = gpt(cli, "run", *SMALL, "--data", data, "--iters", "5", "--out-dir", run_dir)
    assert r.exit_code == 1
    assert error_line(r) == (
        f"Error: {run_dir} already holds a run (ckpt.pt, best.pt, metrics.jsonl); continue it "
        f"with `gpt run --resume {run_dir}`, pick another --out-dir, or pass --overwrite to "
        f"replace it")
    assert "data:" not in r.output  # refused before the data is read
    assert snapshot(run_dir) == before
    r = gpt(cli, "run", *SMALL, "--data", data, "--iters", "5", "--eval-interval", "5",
            "--out-dir", run_dir, "--overwrite")
    assert r.exit_code == 0, r.output
    assert load_checkpoint(run_dir).train_state.step == 5


def test_two_runs_in_one_folder_at_once_the_second_is_refused(cli, data, run_dir):
    from gptlab.core.runs import RunFolder

    before = snapshot(run_dir)
    with RunFolder(run_dir, resume=True):  # another run holds it
        r = gpt(cli, "run", "--resume", run_dir)
    assert r.exit_code == 1
    assert error_line(r) == (f"Error: another run (pid {os.getpid()}) is writing to {run_dir}; "
                             f"wait for it to finish or pick another --out-dir")
    assert snapshot(run_dir) == before
    r = gpt(cli, "run", "--resume", run_dir)  # released: it continues (already at its end)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("where", ["parent-is-a-file", "folder-is-a-file"])
def test_an_unwritable_out_dir_is_one_line(cli, data, tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    out = blocker / "run" if where == "parent-is-a-file" else blocker
    r = CliRunner().invoke(cli, ["run", *SMALL, "--data", str(data), "--out-dir", str(out)])
    assert r.exit_code != 0
    if where == "parent-is-a-file":
        assert error_line(r) == (f"Error: cannot write to the run folder {out}: Not a directory; "
                                 f"pick another --out-dir")
    else:  # click refuses a file as --out-dir
        assert "is a file" in error_line(r)
    assert blocker.read_text() == "a file"


def test_orphan_temp_files_of_a_killed_save_are_removed(cli, data, run_dir):
    orphan = run_dir / "ckpt.pt.k1ll3d.tmp"
    orphan.write_bytes(b"half a checkpoint")
    r = gpt(cli, "run", "--resume", run_dir)
    assert r.exit_code == 0, r.output
    assert not orphan.exists()


def test_a_torn_last_metrics_line_does_not_stop_resume_or_plot(cli, data, tmp_path):
    out = tmp_path / "run"
    r = gpt(cli, "run", *SMALL, "--data", data, "--iters", "20", "--eval-interval", "10",
            "--out-dir", out)
    assert r.exit_code == 0
    unfinish(out)
    # what a kill mid-write leaves: a cut record after the last checkpoint
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "step": 2')
    from gptlab.core.runs import read_metrics

    assert len(read_metrics(out)) > 2
    r = gpt(cli, "run", "--resume", out)
    assert r.exit_code == 0, r.output
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


# ------------------------------------------------------------------ NaN
def test_divergence_saves_nothing_non_finite_and_resume_may_lower_lr(cli, data, tmp_path):
    out = tmp_path / "run"
    r = gpt(cli, "run", *SMALL, "--data", data, "--iters", "30", "--eval-interval", "1",
            "--lr", "1e6", "--out-dir", out)
    assert r.exit_code == 1
    line = error_line(r)
    assert line.startswith("Error: training diverged at step ")
    ckpt = load_checkpoint(out)
    saved = ckpt.train_state.step
    assert line.endswith(f"nothing non-finite was saved; {out}/ckpt.pt holds step {saved}: "
                         f"continue it with a lower learning rate, e.g. `gpt run --resume {out} "
                         f"--lr 100000`")
    assert all(torch.isfinite(t).all() for t in ckpt.model.values())
    for rec in (out / "metrics.jsonl").read_text().splitlines():  # strict JSON, no NaN
        json.loads(rec, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
    r = gpt(cli, "run", "--resume", out, "--lr", "1e-3")
    assert r.exit_code == 0, r.output
    assert f"resuming {out} at step {saved}/30 with --lr 0.001 (was 1e+06)" in r.output


def test_a_non_finite_learning_rate_is_refused(cli, data, tmp_path):
    r = gpt(cli, "run", *SMALL, "--data", data, "--lr", "inf", "--iters", "1", "--out-dir",
            tmp_path / "x")
    assert error_line(r) == "Error: learning_rate (--lr) must be a finite number > 0, got inf"
    assert not (tmp_path / "x").exists()


def test_eval_and_sample_refuse_a_checkpoint_with_nan_weights(cli, run_dir):
    ckpt = load_checkpoint(run_dir)
    name = next(k for k in ckpt.model if k.startswith("blocks."))  # not the tied wte/lm_head
    ckpt.model[name] = torch.full_like(ckpt.model[name], float("nan"))
    bad = run_dir / "nan.pt"
    save_checkpoint(bad, ckpt)
    for cmd in ("eval", "sample"):
        r = gpt(cli, cmd, bad)
        assert r.exit_code == 1
        assert error_line(r) == (
            f"Error: checkpoint '{bad}' holds non-finite weights (NaN or inf in {name}): it was "
            f"saved after training diverged; use an earlier checkpoint or train again with a "
            f"lower --lr")


# ------------------------------------------------------------------ signals
class _SignalAt(Trainer):
    """Sends a real signal to this process at a chosen point of the run."""

    def __init__(self, *a, signum, at, **kw):
        super().__init__(*a, **kw)
        self.signum, self.at = signum, at

    def evaluate(self, iters, **kw):
        if self.at == "final-eval" and self.state.step == self.cfg.max_iters:
            os.kill(os.getpid(), self.signum)
        return super().evaluate(iters, **kw)

    def step(self):
        loss = super().step()
        if self.at == "step" and self.state.step == 3:
            os.kill(os.getpid(), self.signum)
        return loss


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("at", ["step", "final-eval"])
def test_a_signal_at_any_point_saves_first(registry, tmp_path, signum, at):
    mc = ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, attention="naive")
    tc = TrainConfig(max_iters=6, batch_size=4, eval_interval=100, eval_iters=2,
                     final_eval_iters=50, seed=1)
    out = tmp_path / "run"
    trainer = _SignalAt(registry, mc, tc, TEXT, out_dir=out, signum=signum, at=at)
    with pytest.raises(TrainingInterrupted) as e:
        trainer.fit()
    step = 3 if at == "step" else 6
    what = "interrupted" if signum == signal.SIGINT else "stopped by SIGTERM"
    during = "during the final evaluation " if at == "final-eval" else ""
    assert str(e.value) == (f"{what} {during}after step {step}; checkpoint saved to "
                            f"{out}/ckpt.pt; continue with `gpt run --resume {out}`")
    assert e.value.exit_code == 128 + signum
    assert load_checkpoint(out).train_state.step == step
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers put back
    # resuming finishes the run
    result = Trainer(registry, mc, tc, TEXT, out_dir=out, resume=load_checkpoint(out)).fit()
    assert result.history[-1]["step"] == 6


def test_sigterm_to_gpt_run_saves_and_exits_143(data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", "from gptlab.cli import main; main()", "run", *SMALL,
           "--data", str(data), "--iters", "5000", "--out-dir", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # progress lines; stop it once training runs
            if line.startswith("step "):
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.stderr.read()
        assert proc.wait(timeout=120) == 143
    finally:
        proc.kill()
    assert "Error: stopped by SIGTERM after step " in rest
    assert load_checkpoint(out).train_state.step > 0


# ------------------------------------------------------------------ data
def test_a_wrong_war_and_peace_copy_is_refused(cli, tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "war_and_peace.txt").write_text("Not Tolstoy at all. " * 100)
    monkeypatch.setenv("GPTLAB_DATA_DIR", str(folder))
    r = gpt(cli, "run", *SMALL, "--out-dir", tmp_path / "run")
    assert error_line(r).startswith(f"Error: {folder}/war_and_peace.txt is not war_and_peace: "
                                    f"its sha256 is ")
    assert error_line(r).endswith("(damaged, or another file of that name); replace it with the "
                                  "text of https://www.gutenberg.org/cache/epub/2600/pg2600.txt, "
                                  "or pass it with --data PATH to train on it anyway")
    monkeypatch.delenv("GPTLAB_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "gptlab" / "war_and_peace.txt"
    cached.parent.mkdir(parents=True)
    cached.write_text("A damaged copy.\n")
    r = gpt(cli, "run", *SMALL, "--out-dir", tmp_path / "run")
    assert "delete it to download it again, or pass it with --data PATH" in error_line(r)
    assert cached.read_text() == "A damaged copy.\n"


def test_resume_on_another_text_is_refused(cli, data, run_dir, tmp_path):
    unfinish(run_dir)
    other = tmp_path / "other.txt"
    other.write_text(TEXT.replace("Pierre", "Pyotr"))
    before = snapshot(run_dir)
    r = gpt(cli, "run", "--resume", run_dir, "--data", other)
    ckpt = load_checkpoint(run_dir)
    assert error_line(r) == (
        f"Error: {other} is not the text this run was trained on (sha256 "
        f"{hashlib.sha256(other.read_bytes()).hexdigest()[:12]}..., the run's "
        f"{ckpt.train_state.data_sha256[:12]}... from {data}); resume with that text, or start "
        f"a new run")
    assert snapshot(run_dir) == before


def test_crlf_files_train_like_lf_files(registry, tmp_path):
    from gptlab.data.corpora import load_text

    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(TEXT.replace("\n", "\r\n").encode())
    assert load_text(crlf) == TEXT
    mc = ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, attention="naive")
    tc = TrainConfig(max_iters=1, batch_size=2, eval_iters=1, final_eval_iters=1)
    trainer = Trainer(registry, mc, tc, load_text(crlf))
    assert "\r" not in trainer.tokenizer.chars


def test_a_folder_as_data_is_named_as_such(cli, tmp_path):
    r = gpt(cli, "run", *SMALL, "--data", tmp_path, "--out-dir", tmp_path / "run")
    assert error_line(r) == (f"Error: data path '{tmp_path}' is a folder; pass --data with the "
                             f"path of a UTF-8 text file")


# ------------------------------------------------------------------ options
@pytest.mark.parametrize("args, message", [
    (["eval", "{run}", "--batch-size", "-1"], "Invalid value for '--batch-size': -1 is not in "
                                              "the range x>=1."),
    (["eval", "{run}", "--batch-size", "0"], "Invalid value for '--batch-size': 0 is not in the "
                                             "range x>=1."),
    (["bench", "generate", "{run}", "--tokens", "-1"], "Invalid value for '--tokens': -1 is not "
                                                      "in the range x>=1."),
    (["bench", "generate", "{run}", "--tokens", "0"], "Invalid value for '--tokens': 0 is not in "
                                                     "the range x>=1."),
    (["sample", "{run}", "--prompt", "Pierre", "--temperature", "nan"],
     "temperature must be a finite number >= 0, got nan"),
    (["sample", "{run}", "--prompt", "Pierre", "--temperature", "-1"],
     "temperature must be a finite number >= 0, got -1.0"),
    (["sample", "{run}", "--prompt", "Pierre", "--seed", str(2**64)],
     f"seed must be an integer in [0, 2**63 - 1], got {2**64}"),
    (["run", "--seed", str(2**64)], f"seed (--seed) must be an integer in [0, 2**63 - 1], got "
                                    f"{2**64}"),
    (["run", "--iters", "0"], "max_iters (--iters) must be a positive integer, got 0"),
    (["run", "--preset", "bigram", "--device", "meta"],
     "device 'meta' is not available: gptlab runs on cpu, cuda, mps, not meta; use --device "
     "cpu"),
    (["run", "--preset", "bigram", "--device", "xpu"],
     "device 'xpu' is not available: gptlab runs on cpu, cuda, mps, not xpu; use --device cpu"),
])
def test_bad_options_are_one_line_and_nothing_is_printed_first(cli, run_dir, data, args,
                                                               message):
    args = [a.format(run=run_dir) for a in args]
    if args[0] == "run":
        args += ["--data", str(data), "--out-dir", str(run_dir.parent / "new")]
    before = snapshot(run_dir)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code in (1, 2), r.output
    assert error_line(r) == f"Error: {message}"
    assert "Pierre" not in r.output  # the prompt is not echoed before the options are checked
    assert snapshot(run_dir) == before


def test_a_tiny_temperature_is_greedy_not_a_crash(cli, run_dir):
    greedy = gpt(cli, "sample", run_dir, "--prompt", "Pierre", "--temperature", "0",
                 "--tokens", "20")
    tiny = gpt(cli, "sample", run_dir, "--prompt", "Pierre", "--temperature", "1e-45",
               "--tokens", "20", "--seed", "3")
    assert tiny.exit_code == 0 and tiny.output == greedy.output


def test_a_checkpoint_missing_its_model_config_is_one_line(cli, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"format": "gptlab.checkpoint", "version": 2, "train_config": {}}, path)
    for cmd in ("sample", "eval"):
        r = gpt(cli, cmd, path)
        assert error_line(r) == (f"Error: checkpoint '{path}' is incomplete (missing "
                                 f"'model_config'); it was not written by gptlab {gptlab.__version__}")


def test_other_libraries_messages_are_cut_at_a_word():
    text = "RuntimeError: " + "word " * 60 + "\nsecond line"
    line = first_line(text, 40)
    assert len(line) <= 40 and line.endswith("word...") and "\n" not in line
    assert first_line("\n\n  short  \nmore") == "short"


# ------------------------------------------------------------------ memory and disk
@pytest.mark.parametrize("flag, value", [("--n-embd", "100000"), ("--batch-size", "10000000")])
def test_a_run_too_big_for_memory_is_refused_before_allocating(cli, data, tmp_path, flag, value):
    r = gpt(cli, "run", *SMALL, "--data", data, flag, value, "--out-dir", tmp_path / "run")
    assert r.exit_code == 1
    line = error_line(r)
    assert line.startswith("Error: this run needs about ") and " GiB available; lower " in line
    assert line.endswith("lower --batch-size, --block-size, --n-embd or --n-layer")
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_a_full_disk_keeps_the_previous_checkpoint(data, tmp_path):
    """The file system refuses the write (a file-size limit stands in for a full disk): one
    line naming the file, the previous checkpoint intact."""
    out = tmp_path / "run"
    script = textwrap.dedent("""
        import resource, signal, sys
        from gptlab.cli import main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
        main(sys.argv[1:])
    """)
    args = [*SMALL, "--data", str(data), "--iters", "4", "--eval-interval", "2",
            "--out-dir", str(out)]
    proc = subprocess.run([sys.executable, "-c", script, "run", *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"Error: cannot write checkpoint {out}/ckpt.pt: File too large (nothing was "
                    f"saved); free some space and start the run again")
    # nothing saved, nothing left: the folder the run made is gone, so starting again works
    # (it was once "continue with --resume", which then said "train one")
    assert not out.exists()
