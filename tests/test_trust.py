"""Nothing from disk is trusted (issue 21): the second outside sweep's examples, one test each.
Every case asserts the exact line the user sees and that the files which existed before are
byte-identical after. The classes: validate before deleting (--overwrite); checkpoints as
untrusted input (one validator, before anything is built); eval checks its text; sizes checked
before the work; plugins and files; silence and circles. The fuzz test of the checkpoint reader
is tests/test_checkpoint_fuzz.py."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import SMALL, TEXT, error_line, gpt, make_dist, write_module
from gptlab.cli import build_cli
from gptlab.core.checkpoint import load_checkpoint, save_checkpoint
from gptlab.core.errors import printable
from gptlab.core.plugins import load_registry
from gptlab.core.runs import RunFolder

def snapshot(*folders: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folders`` (the lock file aside), by path."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for f in folders for p in sorted(Path(f).rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def trained(registry, tmp_path_factory):
    """A finished small run (20 steps) and its text; tests copy it (``run_dir``)."""
    base = tmp_path_factory.mktemp("trained")
    data = base / "small.txt"
    data.write_text(TEXT)
    out = base / "run"
    r = gpt(build_cli(registry), "run", *SMALL, "--data", data, "--iters", "20",
            "--eval-interval", "10", "--out-dir", out)
    assert r.exit_code == 0, r.output
    return out, data


@pytest.fixture
def run_dir(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    return out


@pytest.fixture
def data(trained, tmp_path):
    path = tmp_path / "small.txt"
    shutil.copyfile(trained[1], path)
    return path


def unfinish(run_dir: Path) -> None:
    """As if stopped during its final evaluation: --resume has that evaluation left to do."""
    ckpt = load_checkpoint(run_dir)
    ckpt.train_state.history.pop()
    save_checkpoint(run_dir / "ckpt.pt", ckpt)


def forge(src: Path, dest: Path, mutate) -> Path:
    """A copy of checkpoint ``src`` whose payload ``mutate(payload)`` changed."""
    payload = torch.load(src, weights_only=True)
    mutate(payload)
    torch.save(payload, dest)
    return dest


# ------------------------------------------------------------------ 1. validate before deleting
@pytest.mark.parametrize("case", ["missing", "empty", "not-utf8", "too-short", "too-big"])
def test_overwrite_checks_everything_before_touching_the_old_run(cli, run_dir, tmp_path, case):
    """Before: `--overwrite --data typo.txt` deleted ckpt.pt, best.pt and metrics.jsonl, then
    failed on the missing text (the same for an empty, non-UTF-8 or too short text, and a model
    the memory pre-flight refuses)."""
    text = tmp_path / "text.txt"
    extra = []
    if case == "empty":
        text.write_text("")
    elif case == "not-utf8":
        text.write_bytes(b"\xff\xfe War and Peace")
    elif case == "too-short":
        text.write_text("Pierre. " * 3)
    elif case == "too-big":
        text.write_text(TEXT)
        extra = ["--n-embd", "100000"]
    before = snapshot(run_dir)
    r = gpt(cli, "run", *SMALL, *extra, "--out-dir", run_dir, "--overwrite", "--data", text)
    assert r.exit_code == 1
    line = error_line(r)
    expected = {
        "missing": f"Error: data file '{text}' does not exist; pass --data with the path of a "
                   f"UTF-8 text file, or one of: war_and_peace",
        "empty": f"Error: data file '{text}' is empty; pass a file with some text",
        "not-utf8": f"Error: data file '{text}' is not UTF-8 (invalid byte 0xff at offset 0); "
                    f"convert it, e.g. iconv -t utf-8",
        "too-short": "Error: the val split has 3 tokens, fewer than block_size + 1 = 17; use a "
                     "longer text or a smaller --block-size",
    }
    if case == "too-big":
        assert line.startswith("Error: this run needs about ")
        assert line.endswith("lower --batch-size, --block-size, --n-embd or --n-layer")
    else:
        assert line == expected[case]
    assert snapshot(run_dir) == before
    assert not (run_dir / ".replaced").exists()


def test_an_overwrite_that_fails_before_its_first_checkpoint_puts_the_old_run_back(
        cli, run_dir, data):
    """A new run that diverges before its first evaluation saved nothing: the run it was to
    replace is back, byte for byte."""
    before = snapshot(run_dir)
    r = gpt(cli, "run", *SMALL, "--data", data, "--iters", "30", "--eval-interval", "25",
            "--lr", "1e6", "--out-dir", run_dir, "--overwrite")
    assert r.exit_code == 1
    line = error_line(r)
    assert line.startswith("Error: training diverged at step ")
    assert line.endswith("nothing non-finite was saved; train again with a lower --lr (this "
                         "run used 1e+06)")
    assert snapshot(run_dir) == before
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "best.pt", "ckpt.pt",
                                                         "metrics.jsonl"]


def test_stopping_at_once_before_the_first_checkpoint_of_an_overwrite_keeps_the_old_run(
        cli, run_dir, data, monkeypatch):
    """A second Ctrl-C stops training at once, with no checkpoint written yet: the run it was
    to replace is back."""
    from gptlab.core import trainer

    def step(self):  # what the second Ctrl-C raises, in the middle of a step
        raise KeyboardInterrupt

    before = snapshot(run_dir)
    monkeypatch.setattr(trainer.Trainer, "step", step)
    r = gpt(cli, "run", *SMALL, "--data", data, "--out-dir", run_dir, "--overwrite")
    assert r.exit_code == 130
    assert error_line(r) == "Error: interrupted"
    assert snapshot(run_dir) == before


def test_a_replaced_run_left_by_a_killed_overwrite_is_put_back(run_dir):
    """SIGKILL after the old run was moved aside and before the new one's first checkpoint:
    the next run that opens the folder puts the old one back."""
    before = snapshot(run_dir)
    folder = RunFolder(run_dir, overwrite=True)
    folder.begin()
    (run_dir / "metrics.jsonl").write_text('{"kind": "step", "step": 1, "train_loss": 3.0}\n')
    os.close(folder._fd)  # what a kill does: no clean-up, the kernel drops the lock
    folder._fd = None
    assert sorted(p.name for p in (run_dir / ".replaced").iterdir()) == [
        "best.pt", "ckpt.pt", "metrics.jsonl"]
    with RunFolder(run_dir, resume=True):
        pass
    assert snapshot(run_dir) == before and not (run_dir / ".replaced").exists()


def test_an_overwrite_replaces_the_old_run_once_it_wrote_its_first_checkpoint(
        cli, run_dir, data):
    old = load_checkpoint(run_dir).train_state.step
    r = gpt(cli, "run", *SMALL, "--data", data, "--iters", "5", "--eval-interval", "5",
            "--out-dir", run_dir, "--overwrite")
    assert r.exit_code == 0, r.output
    assert (old, load_checkpoint(run_dir).train_state.step) == (20, 5)
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "best.pt", "ckpt.pt",
                                                         "metrics.jsonl"]


# ------------------------------------------------------------------ 2. checkpoints untrusted
def _set(path, value):
    def mutate(payload):
        *parents, last = path
        d = payload
        for key in parents:
            d = d[key]
        d[last] = value
    return mutate


def _wider_vocab(payload):
    payload["tokenizer"]["state"]["chars"] += "XYZ"


@pytest.mark.parametrize("mutate, message", [
    (_set(["model_config", "n_layer"], 100000),
     "holds an invalid config: n_layer (--n-layer) must be an integer in [1, 1024], got 100000"),
    (_set(["model_config", "n_layer"], 3),
     "does not match its model config: it lacks blocks.2.ln_1.weight and 11 more"),
    (_set(["model_config"], ["n_layer", 2]),
     "is damaged or was not written by gptlab: model_config is not a mapping of names to "
     "values"),
    (_set(["tokenizer", "state"], "abc"),
     "is damaged or was not written by gptlab: tokenizer.state is not a mapping of names to "
     "values"),
    (_set(["tokenizer", "state"], {"chars": 7}),
     "holds a 'char' tokenizer state that cannot be read (a char tokenizer state holds its "
     "characters as one non-empty string under 'chars')"),
    (_wider_vocab,
     "holds a tokenizer of 28 symbols for a model with a vocabulary of 25; it is damaged or "
     "was not written by gptlab"),
    (_set(["train_state", "step"], -5),
     "is damaged or was not written by gptlab: train_state.step is not an integer >= 0"),
    (_set(["model_config", "block_size"], 1e9),
     "holds an invalid config: block_size (--block-size) must be a positive integer, got "
     "1000000000.0"),
    (_set(["model_config", "block_size"], 10**9),
     "does not match its model config: wpe.weight is (16, 32) float32, its config makes "
     "(1000000000, 32) float32"),
    (_set(["train_state", "data_source"], 5),
     "is damaged or was not written by gptlab: train_state.data_source is not a name or path "
     "(a string of 1 to 4096 characters)"),
    (_set(["model", "wte.weight"], "weights"),
     "is damaged or was not written by gptlab: model['wte.weight'] is not a dense tensor"),
    (_set(["model", "ln_f.weight"], torch.ones(32, dtype=torch.float64)),
     "does not match its model config: ln_f.weight is (32,) float64, its config makes (32,) "
     "float32"),
    (_set(["metrics"], [1, 2]),
     "is damaged or was not written by gptlab: metrics is not a mapping of names to values"),
    (_set(["model_config", "model"], "gpt5"),
     "needs a part that is not installed: unknown model 'gpt5'; available: bigram, "
     "transformer; install the plugin that provides it"),
], ids=["n_layer-100000", "n_layer-3", "config-not-a-dict", "tokenizer-state-type",
        "tokenizer-chars-type", "vocab-larger", "negative-step", "block-size-1e9-float",
        "block-size-1e9", "data-source-type", "weight-not-a-tensor", "weight-dtype",
        "metrics-type", "unknown-model"])
@pytest.mark.parametrize("command", ["sample", "eval", "bench-generate"])
def test_a_malformed_checkpoint_is_one_line_before_anything_is_built(cli, run_dir, tmp_path,
                                                                     monkeypatch, mutate,
                                                                     message, command):
    """Before: `n_layer` 100000 with weights for 2 layers made `gpt sample` build the model
    first (23.8 GB, killed by the kernel); the other fields were tracebacks."""
    from gptlab.core import planning

    bad = forge(run_dir / "ckpt.pt", tmp_path / "bad.pt", mutate)
    before = snapshot(run_dir, tmp_path)

    def no_build(*a, **kw):
        raise AssertionError("a model was built from a checkpoint that does not check out")

    monkeypatch.setattr(planning, "build_model", no_build)
    monkeypatch.setattr("gptlab.core.checkpoint.build_model", no_build)
    args = {"sample": ["sample", bad], "eval": ["eval", bad],
            "bench-generate": ["bench", "generate", bad]}[command]
    r = gpt(cli, *args)
    assert r.exit_code == 1
    assert error_line(r) == f"Error: checkpoint '{bad}' {message}"
    assert snapshot(run_dir, tmp_path) == before


def _rng(payload):
    payload["train_state"]["batch_rngs"][0] = torch.zeros(10, dtype=torch.uint8)


def _torch_rng(payload):
    payload["train_state"]["torch_rng"] = torch.zeros(3, 3)


def _exp_avg(payload):
    payload["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)


def _betas(payload):
    payload["optimizer"]["param_groups"][0]["betas"] = "high"


@pytest.mark.parametrize("mutate, message", [
    (_rng, "is damaged or was not written by gptlab: train_state.batch_rngs[0] is not a random "
           "generator state (a uint8 tensor of 5056 bytes)"),
    (_torch_rng, "is damaged or was not written by gptlab: train_state.torch_rng is not a "
                 "random generator state (a uint8 tensor of 5056 bytes)"),
    (_exp_avg, "holds an optimizer or generator state this run cannot continue from (its "
               "'exp_avg' is (3,) for a parameter of (25, 32)); it is damaged or was not "
               "written by gptlab"),
    (_betas, "holds an optimizer or generator state this run cannot continue from (group 0 "
             "setting 'betas' is not a tuple); it is damaged or was not written by gptlab"),
    (_set(["optimizer"], [1]),
     "is damaged or was not written by gptlab: optimizer is not a mapping of names to values"),
], ids=["batch-rng", "torch-rng", "optimizer-shape", "optimizer-setting", "optimizer-type"])
def test_a_malformed_resume_state_is_one_line(cli, run_dir, data, mutate, message):
    unfinish(run_dir)
    forge(run_dir / "ckpt.pt", run_dir / "ckpt.pt", mutate)
    before = snapshot(run_dir)
    r = gpt(cli, "run", "--resume", run_dir, "--data", data)
    assert r.exit_code == 1
    assert error_line(r) == f"Error: checkpoint '{run_dir}/ckpt.pt' {message}"
    assert snapshot(run_dir) == before


def test_eval_never_reads_a_file_a_checkpoint_names_as_its_text(cli, run_dir, tmp_path):
    """Before: a `data_source` naming any file made `gpt eval` read it and quote a character of
    it in the error."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET: the password is ~hunter2~\n")
    forge(run_dir / "ckpt.pt", run_dir / "ckpt.pt",
          _set(["train_state", "data_source"], str(secret)))
    sha = hashlib.sha256(secret.read_bytes()).hexdigest()
    run_sha = load_checkpoint(run_dir).train_state.data_sha256
    before = snapshot(run_dir, tmp_path)
    r = gpt(cli, "eval", run_dir)
    assert r.exit_code == 1
    assert error_line(r) == (
        f"Error: {secret} is not the text this run was trained on (sha256 {sha[:12]}..., the "
        f"run's {run_sha[:12]}... from {secret}); pass --data with the text it was trained on "
        f"(or with this file, to evaluate on another text)")
    assert "hunter2" not in r.output and "~" not in r.output
    assert snapshot(run_dir, tmp_path) == before


def test_escape_codes_from_a_checkpoint_never_reach_the_terminal(cli, run_dir, tmp_path):
    """Before: escape codes in `gptlab_version` were printed raw (a forged `Error:` line)."""
    forged = "\x1b[2K\rError: all good\x1b[0m"
    bad = forge(run_dir / "ckpt.pt", tmp_path / "bad.pt",
                lambda p: p.update(version=3, gptlab_version=forged))
    r = gpt(cli, "sample", bad)
    assert r.exit_code == 1
    assert error_line(r) == (
        f"Error: checkpoint '{bad}' has format version 3 (written by a newer gptlab, "
        f"\\x1b[2K\\rError: all good\\x1b[0m); this gptlab 0.3.0 reads version 2: use the "
        f"gptlab that wrote it, or train again")
    assert "\x1b" not in r.output and "\r" not in r.output
    assert printable("a\x1b[31mb\u202ec\n", keep="") == "a\\x1b[31mb\\u202ec\\n"


# ------------------------------------------------------------------ 3. numbers about the right text
def test_eval_refuses_a_training_text_that_changed(cli, run_dir, data):
    """Before: `gpt eval RUN` after the training text changed reported a loss on the new text
    as if it were the old one (resume checked the SHA-256; eval did not)."""
    run_sha = load_checkpoint(run_dir).train_state.data_sha256
    r = gpt(cli, "eval", run_dir, "--data", data)
    assert r.exit_code == 0 and " (not the text" not in r.output
    with open(data, "a") as f:
        f.write("Pierre. " * 100)
    r = gpt(cli, "eval", run_dir, "--data", data)
    assert r.exit_code == 0 and f"val split of {data} (not the text the run was trained on)" \
        in r.output  # named explicitly: evaluated, and said to be another text
    forge(run_dir / "ckpt.pt", run_dir / "ckpt.pt", _set(["train_state", "data_source"],
                                                         str(data)))
    before = snapshot(run_dir)
    r = gpt(cli, "eval", run_dir)
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    assert error_line(r) == (
        f"Error: {data} is not the text this run was trained on (sha256 {sha[:12]}..., the "
        f"run's {run_sha[:12]}... from {data}); pass --data with the text it was trained on (or "
        f"with this file, to evaluate on another text)")
    assert snapshot(run_dir) == before


# ------------------------------------------------------------------ 4. sizes before the work
def test_a_block_size_longer_than_the_text_is_refused_before_backends_are_timed(
        cli, war_and_peace, tmp_path, monkeypatch):
    """Before: `gpt run --block-size 400000` (auto attention) timed the backends for minutes
    before noticing that the val split is shorter."""
    from gptlab.core import planning

    def no_plan(*a, **kw):
        raise AssertionError("planned (and timed the backends) before sizing the run")

    monkeypatch.setattr(planning, "plan_run", no_plan)
    r = gpt(cli, "run", "--preset", "tiny", "--block-size", "400000", "--out-dir",
            tmp_path / "run")
    assert r.exit_code == 1
    assert error_line(r) == ("Error: the val split has 322752 tokens, fewer than block_size + 1 "
                             "= 400001; use a longer text or a smaller --block-size")
    assert not (tmp_path / "run").exists()


def test_bench_attention_sizes_its_points_before_running_any(cli, monkeypatch):
    """Before: `gpt bench attention --seq-lens 200000` ran with no size check."""
    from gptlab.bench import attention

    monkeypatch.setattr(attention, "run", lambda *a, **kw: pytest.fail("a point was run"))
    r = gpt(cli, "bench", "attention", "--seq-lens", "64,200000", "--backends", "naive,sdpa")
    assert r.exit_code == 1
    line = error_line(r)
    assert line.startswith("Error: --seq-lens 200000 needs about 14,311.2 GiB for naive (B=8, "
                           "H=4, D=32) but cpu has ")
    assert line.endswith(" GiB available; lower --seq-lens or --batch, or leave naive out with "
                         "--backends")


def test_generation_allocates_what_it_generates_not_what_was_asked(cli, run_dir):
    """Before: `gpt sample --tokens 1000000000` allocated 8 GB up front (10**12 tokens would
    have been 8 TB: an error at once)."""
    r = gpt(cli, "sample", run_dir, "--tokens", str(10**12), "--stop", "e", "--seed", "1",
            "--prompt", "Pierre")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("Pierre") and r.output.rstrip("\n").endswith("e")


# ------------------------------------------------------------------ 5. plugins and files
WRONG_ARGUMENT = """
    from gptlab import hookimpl
    @hookimpl
    def register_models(registry):
        return []
"""


def test_a_hook_with_a_wrong_argument_name_is_one_problem_not_a_traceback(tmp_path,
                                                                         monkeypatch):
    """Before: a hook function with a wrong argument name made every command a traceback,
    `gpt plugins` included."""
    site = make_dist(tmp_path, "x-dist", {"x": "x_wrong"})
    write_module(site, "x_wrong", WRONG_ARGUMENT)
    monkeypatch.syspath_prepend(str(site))
    try:
        reg = load_registry()
    finally:
        sys.modules.pop("x_wrong", None)
    problem = ("plugin 'x' (x_wrong (x-dist 0.1.0)) cannot be registered (ignored): "
               "PluginValidationError: Plugin 'x' for hook 'register_models'; hookimpl "
               "definition: register_models(registry); Argument(s) {'registry'} are declared in "
               "the hookimpl but can not be found in the hookspec")
    assert reg.problems == [problem]
    assert {"bigram", "transformer"} <= set(reg.models)
    r = CliRunner().invoke(build_cli(reg), ["plugins"])
    assert r.exit_code == 0 and f"WARNING: {problem}" in r.stdout
    assert not any(ln.startswith("x ") for ln in r.stdout.splitlines())  # not listed
    r = CliRunner().invoke(build_cli(reg), ["presets"])
    assert r.exit_code == 0 and r.stderr.splitlines() == [f"WARNING: {problem}"]


@pytest.mark.parametrize("content", [
    b"", b"\x00" * 100, b"PK\x03\x04" + b"\x00" * 60, b'{"format": "gptlab.checkpoint"}',
    os.urandom(4096)], ids=["empty", "zeros", "zip-header", "json", "random"])
def test_junk_given_as_a_checkpoint_is_one_line(cli, tmp_path, content):
    """Before: 11 of 47 fuzzed junk files gave KeyError/IndexError tracebacks (more:
    tests/test_checkpoint_fuzz.py)."""
    junk = tmp_path / "junk.pt"
    junk.write_bytes(content)
    r = gpt(cli, "sample", junk)
    assert r.exit_code == 1
    assert error_line(r).startswith(f"Error: checkpoint '{junk}' is truncated or not a torch "
                                    f"file (")
    assert junk.read_bytes() == content


def test_a_metrics_line_that_is_not_a_record_is_one_line_for_plot(cli, run_dir, tmp_path):
    """Before: a `metrics.jsonl` line that is a JSON array broke `gpt plot`."""
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n")
    n = len((run_dir / "metrics.jsonl").read_text().splitlines())
    before = snapshot(run_dir)
    r = gpt(cli, "plot", run_dir, "--out", tmp_path / "loss.png")
    assert r.exit_code == 1
    assert error_line(r) == (f"Error: {run_dir}/metrics.jsonl:{n} is not a JSON object, not a "
                             f"record gptlab wrote; remove that line")
    assert snapshot(run_dir) == before and not (tmp_path / "loss.png").exists()


def test_plot_writes_the_format_its_suffix_names(cli, run_dir, tmp_path):
    """Before: `gpt plot --out x.pdf` wrote PNG bytes under that name; `--out` into a missing
    or read-only folder was a traceback."""
    r = gpt(cli, "plot", run_dir, "--out", tmp_path / "x.pdf")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "x.pdf").read_bytes()[:5] == b"%PDF-"
    r = gpt(cli, "plot", run_dir, "--out", tmp_path / "x.svg")
    assert b"<svg" in (tmp_path / "x.svg").read_bytes()[:1000]
    r = gpt(cli, "plot", run_dir, "--out", tmp_path / "x.docx")
    assert error_line(r).startswith(f"Error: gpt plot cannot write '.docx' files "
                                    f"({tmp_path}/x.docx); give --out one of: ")
    (tmp_path / "file").write_text("a file")
    r = gpt(cli, "plot", run_dir, "--out", tmp_path / "file" / "x.png")
    assert error_line(r) == (f"Error: cannot write {tmp_path}/file/x.png: {tmp_path}/file is a "
                             f"file, not a folder; pick another --out")
    r = gpt(cli, "plot", run_dir, "--out", "/proc/gptlab-no-such-folder/x.png")
    assert error_line(r) == ("Error: cannot write /proc/gptlab-no-such-folder/x.png: No such "
                             "file or directory; pick another --out")
    r = gpt(cli, "plot", run_dir, "--out", tmp_path / "new" / "x.png")  # a missing folder: made
    assert r.exit_code == 0 and (tmp_path / "new" / "x.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ 6. silence and circles
def test_auto_without_a_compiler_says_why_in_one_line(cli, data, tmp_path, monkeypatch):
    """Before: a missing compiler under `--attention auto` trained on sdpa and torch kernels
    without a line saying why."""
    monkeypatch.setenv("CC", "/nonexistent/cc")
    args = [a for a in SMALL if a not in ("--attention", "naive")]
    r = gpt(cli, "run", *args, "--data", data, "--iters", "2", "--out-dir", tmp_path / "run")
    assert r.exit_code == 0, r.output
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("note: ")]
    assert notes == ["note: --attention auto runs sdpa and --kernels auto runs torch: flash, "
                     "fused, native cannot run on this machine (compiler for the cpu kernels not "
                     "found ('/nonexistent/cc'; install gcc or set CC))"]


def test_resuming_a_finished_run_says_so_and_writes_nothing(cli, run_dir, data):
    """Before: resuming a finished run evaluated again, appended a duplicate record and printed
    "0 tok/s"."""
    before = snapshot(run_dir)
    r = gpt(cli, "run", "--resume", run_dir)
    assert r.exit_code == 0, r.output
    val = load_checkpoint(run_dir).train_state.history[-1]["val_loss"]
    assert r.output.splitlines() == [
        f"{run_dir} is finished (step 20/20, val loss {val:.4f}); nothing to resume: sample it "
        f"with `gpt sample {run_dir}`"]
    assert snapshot(run_dir) == before


def test_suggested_commands_are_shell_quoted(cli, trained, data, tmp_path):
    """Before: suggested commands were not shell-quoted (paths with spaces broke them)."""
    spaced = tmp_path / "my run's folder"
    shutil.copytree(trained[0], spaced)
    r = gpt(cli, "run", *SMALL, "--data", data, "--out-dir", spaced)
    quoted = "'" + str(spaced).replace("'", "'\"'\"'") + "'"
    assert error_line(r) == (
        f"Error: {spaced} already holds a run (ckpt.pt, best.pt, metrics.jsonl); continue it "
        f"with `gpt run --resume {quoted}`, pick another --out-dir, or pass --overwrite to "
        f"replace it")
    r = gpt(cli, "run", "--resume", spaced)
    assert f"sample it with `gpt sample {quoted}`" in r.output


def test_ctrl_c_before_training_is_130_and_one_line(cli, data, tmp_path, monkeypatch):
    """Before: Ctrl-C before training exited 1 with "Aborted!"."""
    from gptlab.core.session import Session

    def interrupted(self, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(Session, "load_text", interrupted)
    r = gpt(cli, "run", *SMALL, "--data", data, "--out-dir", tmp_path / "run")
    assert r.exit_code == 130
    assert r.output.splitlines() == ["Error: interrupted before training started; nothing was "
                                     "saved"]
    assert not (tmp_path / "run").exists()


def test_a_real_ctrl_c_then_a_second_one_at_exit_leave_no_traceback(data, tmp_path):
    """Before: a second Ctrl-C printed an atexit traceback. The first Ctrl-C comes while the
    text loads; the second while Python runs its exit handlers."""
    script = textwrap.dedent("""
        import atexit, os, signal, sys, time
        import gptlab.data.corpora as corpora

        def load_text(path):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
            raise SystemExit("the first Ctrl-C was not delivered")

        def second_ctrl_c():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)

        corpora.load_text = load_text
        atexit.register(second_ctrl_c)
        from gptlab.__main__ import main
        main(sys.argv[1:])
    """)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", script, "run", *SMALL, "--data", str(data),
                           "--out-dir", str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GPTLAB_AUTO": "priority"},
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.splitlines() == ["Error: interrupted before training started; nothing "
                                        "was saved"]
    assert not out.exists()


def test_time_budget_zero_is_documented(cli):
    r = gpt(cli, "run", "--help")
    assert "0 means no budget: --iters steps." in " ".join(r.output.split())
