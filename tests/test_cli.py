"""The `gpt` CLI through click's CliRunner."""

import pytest
from click.testing import CliRunner


SMALL = ("Prince Andrew looked at Pierre. The old prince was silent, and Natasha laughed.\n"
         * 60)


@pytest.fixture
def small_text(tmp_path):
    p = tmp_path / "small.txt"
    p.write_text(SMALL)
    return p


def invoke(cli, args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_help_explains_every_option(cli):
    result = invoke(cli, ["run", "--help"])
    assert result.exit_code == 0
    for opt in ["--preset", "--data", "--model", "--tokenizer", "--attention", "--block",
                "--device", "--seed", "--iters", "--batch-size", "--block-size", "--n-layer",
                "--n-head", "--n-embd", "--dropout", "--lr", "--out-dir", "--norm", "--mlp",
                "--position", "--qk-norm", "--untied-head", "--zero-init", "--optimizer",
                "--muon-lr"]:
        assert opt in result.output
    for cmd in ["run", "sample", "plugins", "backends", "presets"]:
        assert invoke(cli, [cmd, "--help"]).exit_code == 0


def test_unknown_attention_is_one_line_listing_backends(cli, small_text):
    result = invoke(cli, ["run", "--attention", "nosuch", "--data", str(small_text)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == ["Error: unknown attention backend 'nosuch'; available: auto, flash, "
                     "flash-tc, fused, naive, sdpa"]


def test_named_backend_that_cannot_run_lists_its_reasons(cli, small_text):
    result = invoke(cli, ["run", "--attention", "flash", "--dropout", "0.1",
                          "--data", str(small_text)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: attention backend 'flash' cannot run this request; pick another with "
        "--attention (see `gpt backends`)",
        "  request: device cpu, float32, head_dim 32, q_len 128, k_len 128, causal, with "
        "backward, dropout 0.1",
        "  flash: attention dropout (p=0.1) not supported"]


@pytest.mark.parametrize("args, message", [
    (["--n-embd", "30", "--n-head", "4"], "n_embd (--n-embd) 30 must be divisible by n_head "
                                          "(--n-head) 4"),
    (["--dropout", "1.5"], "dropout (--dropout) must be in [0, 1)"),
    (["--iters", "0"], "max_iters (--iters) must be a positive integer"),
    (["--preset", "huge"], "unknown preset 'huge'; available: bigram, tiny, default, speedrun"),
    (["--model", "gpt5"], "unknown model 'gpt5'; available: bigram, transformer"),
    (["--block", "nope"], "unknown block 'nope'"),
    (["--device", "cuda"], "device 'cuda' is not available"),
    (["--data", "/no/such/file.txt"], "data file '/no/such/file.txt' does not exist"),
    (["--norm", "batchnorm"], "unknown norm 'batchnorm'; available: layernorm, none, rmsnorm"),
    (["--mlp", "moe"], "unknown MLP 'moe'; available: gelu, none, relu2, swiglu"),
    (["--position", "alibi"], "unknown position scheme 'alibi'; available: learned, none, "
                              "rotary"),
    (["--optimizer", "sgd"], "unknown optimizer 'sgd'; available: adamw, muon"),
    (["--muon-lr", "0"], "muon_lr (--muon-lr) must be a finite number > 0"),
    (["--position", "rotary", "--n-embd", "36", "--n-head", "4"],
     "--position rotary needs an even head dim (n_embd / n_head), got 9"),
])
def test_bad_options_are_one_line_errors(cli, args, message, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    result = invoke(cli, ["run", "--preset", "tiny", *args])
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert message in result.output


def test_run_then_sample(cli, small_text, tmp_path):
    out = tmp_path / "run"
    result = invoke(cli, ["run", "--preset", "tiny", "--data", str(small_text), "--iters", "30",
                          "--block-size", "16", "--eval-interval", "10", "--attention", "naive",
                          "--sample-tokens", "40", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "ckpt.pt").is_file()
    assert "val loss" in result.output and "--- sample ---" in result.output
    assert "attention naive" in result.output
    assert "eval: train" in result.output  # progress lines (not a terminal here)
    result = invoke(cli, ["sample", str(out), "--prompt", "Prince", "--tokens", "25",
                          "--seed", "1"])
    assert result.exit_code == 0
    assert result.output.startswith("Prince") and len(result.output.rstrip("\n")) >= 31
    again = invoke(cli, ["sample", str(out / "ckpt.pt"), "--prompt", "Prince", "--tokens", "25",
                         "--seed", "1"])
    assert again.output == result.output
    bad = invoke(cli, ["sample", str(out), "--prompt", "Zebra"])
    assert bad.exit_code == 1
    assert "character 'Z' (U+005A LATIN CAPITAL LETTER Z) at position 0" in bad.output


def test_bench_generate_interleaves_rounds_and_checks_outputs(cli, small_text, tmp_path):
    out = tmp_path / "run"
    result = invoke(cli, ["run", "--preset", "tiny", "--data", str(small_text), "--iters", "4",
                          "--block-size", "16", "--eval-interval", "2", "--attention", "flash",
                          "--sample-tokens", "0", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    result = invoke(cli, ["bench", "generate", str(out), "--tokens", "40", "--rounds", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()  # progress (stderr) and the result (stdout)
    assert [ln.split(":")[0] for ln in lines if "round" in ln[:9]] == ["  round 1/2",
                                                                     "  round 2/2"]
    assert lines[-3].startswith("without cache: ") and lines[-2].startswith("with cache: ")
    assert "x: the median of the rounds' ratios; speeds: medians of 2 interleaved rounds)" \
        in lines[-2]
    assert lines[-1] == "greedy outputs identical: yes (40 tokens)"


def test_bench_generate_speedup_is_the_median_of_each_rounds_ratio():
    from gptlab.bench.generate import GenerateResult

    # each round's two runs saw the same machine; the medians taken apart pair runs of
    # different rounds (1100 / 100 = 11x here)
    r = GenerateResult(40, without_cache=[10.0, 100.0, 110.0],
                       with_cache=[1000.0, 1100.0, 2000.0], identical=True)
    assert r.median_with / r.median_without == 11.0
    assert r.speedup == 2000.0 / 110.0  # the rounds' ratios: 100, 11, 18.2


def test_sample_errors(cli, tmp_path):
    result = invoke(cli, ["sample", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "does not exist" in result.output
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04garbage")
    result = invoke(cli, ["sample", str(tmp_path / "trunc.pt")])
    assert result.exit_code == 1
    assert "truncated or not a torch file" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_plugins_backends_presets(cli):
    result = invoke(cli, ["plugins"])
    assert result.exit_code == 0
    assert "attention backend: naive, sdpa" in result.output
    assert "model: bigram, transformer" in result.output
    result = invoke(cli, ["backends"])
    assert result.exit_code == 0
    assert "sdpa" in result.output and "<- auto" in result.output
    result = invoke(cli, ["backends", "--device", "meta"])
    assert "device 'meta' not supported" in result.output
    assert "<- auto" not in result.output
    result = invoke(cli, ["backends", "--device", "tpu"])
    assert result.exit_code == 1
    assert result.output == "Error: unknown device 'tpu'; use cpu, cuda, cuda:N or auto\n"
    result = invoke(cli, ["presets"])
    assert "bigram:" in result.output and "tiny:" in result.output and "default:" in result.output
    assert "speedrun:" in result.output and "time_budget=530.0" in result.output


def test_the_speedrun_preset_stops_on_its_time_budget(cli, small_text, tmp_path):
    """The speedrun recipe end to end, shrunk: a 2-second budget on a small model."""
    out = tmp_path / "run"
    result = invoke(cli, ["run", "--preset", "speedrun", "--data", str(small_text),
                          "--time-budget", "2", "--n-layer", "1", "--n-embd", "48",
                          "--n-head", "2", "--block-size", "16", "--batch-size", "4",
                          "--attention", "naive", "--sample-tokens", "0", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "of 2.0s of steps" in result.output  # progress in time, not steps
    assert "val loss" in result.output and (out / "ckpt.pt").is_file()


def test_bench_attention_reports_every_backend_against_sdpa(cli):
    result = invoke(cli, ["bench", "attention", "--backends", "flash,naive", "--seq-lens",
                          "16,33", "--reps", "1", "--batch", "1", "--heads", "2"])
    assert result.exit_code == 0, result.output
    rows = [ln.split() for ln in result.output.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [("sdpa", "16"), ("flash", "16"), ("naive", "16"),
                                            ("sdpa", "33"), ("flash", "33"), ("naive", "33")]
    for r in rows:
        assert float(r[2]) > 0  # a measured time
    assert rows[0][3] == "1.00"
    bad = invoke(cli, ["bench", "attention", "--backends", "nosuch"])
    assert bad.exit_code == 1 and "unknown attention backend 'nosuch'" in bad.output


def test_bench_attention_in_bfloat16(cli):
    result = invoke(cli, ["bench", "attention", "--backends", "flash", "--seq-lens", "16",
                          "--reps", "1", "--batch", "1", "--heads", "2", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert ", bfloat16, cpu," in result.output.splitlines()[0]
    rows = [ln.split() for ln in result.output.splitlines()[2:]]
    assert [r[0] for r in rows] == ["sdpa", "flash"] and all(float(r[2]) > 0 for r in rows)


def test_bench_attention_names_the_backends_that_cannot_run_here(cli, monkeypatch):
    """Left out of the default set, but said (e.g. on a GPU whose driver is too old for nvcc)."""
    monkeypatch.setenv("CC", "/nonexistent/cc")
    result = invoke(cli, ["bench", "attention", "--seq-lens", "8", "--reps", "1", "--batch", "1",
                          "--heads", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in ("flash", "fused"):
        assert f"{name}: not run: compiler for the cpu kernels not found ('/nonexistent/cc'; " \
               f"install gcc or set CC)" in lines
    assert [ln.split()[0] for ln in lines[4:]] == ["sdpa", "naive"]


def test_bench_attention_on_an_unavailable_device_is_one_line(cli, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    result = invoke(cli, ["bench", "attention", "--device", "cuda"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: device 'cuda' is not available: ")
    assert result.output.endswith("; use --device cpu\n") and result.output.count("\n") == 1


def test_bench_train_reports_every_variant_against_the_first(cli, small_text, monkeypatch):
    monkeypatch.setenv("GPTLAB_COMPILE_BACKEND", "aot_eager")
    result = invoke(cli, ["bench", "train", "--preset", "tiny", "--variants",
                          "float32@naive,bfloat16@sdpa/torch,float32+compile@naive:torch",
                          "--steps", "1", "--rounds", "2", "--warmup", "1", "--data",
                          str(small_text)])
    assert result.exit_code == 0, result.output
    rows = [ln.split() for ln in result.output.splitlines()
            if ln.split() and ln.split()[0].startswith(("float32", "bfloat16"))]
    assert [tuple(r[:5]) for r in rows] == [
        ("float32@naive", "float32", "naive", "native", "onednn"),
        ("bfloat16@sdpa/torch", "bfloat16", "sdpa", "torch", "torch"),
        ("float32+compile@naive:torch", "float32", "naive", "native", "torch")]
    assert rows[0][6] == "1.00" and all(float(r[5].replace(",", "")) > 0 for r in rows)
    bad = invoke(cli, ["bench", "train", "--variants", "float32+fast"])
    assert bad.exit_code == 1 and "expected DTYPE[+compile][@BACKEND][/KERNELS]" in bad.output
    bad = invoke(cli, ["bench", "train", "--variants", "float32@nosuch"])
    assert bad.exit_code == 1 and "unknown attention backend 'nosuch'" in bad.output


PEER = """
from dataclasses import dataclass
import torch, torch.nn as nn, torch.nn.functional as F

@dataclass
class GPTConfig:
    block_size: int = 8
    vocab_size: int = 10
    n_layer: int = 1
    n_head: int = 1
    n_embd: int = 8
    dropout: float = 0.0
    bias: bool = True

class GPT(nn.Module):  # a bigram with nanoGPT's interface
    def __init__(self, config):
        super().__init__()
        self.table = nn.Embedding(config.vocab_size, config.vocab_size)

    def forward(self, idx, targets=None):
        logits = self.table(idx)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
"""


def test_bench_train_compares_with_a_peer_model_given_by_path(cli, small_text, tmp_path):
    peer = tmp_path / "model.py"
    peer.write_text(PEER)
    result = invoke(cli, ["bench", "train", "--preset", "tiny", "--variants", "float32@naive",
                          "--peer", str(peer), "--steps", "1", "--rounds", "1", "--warmup", "1",
                          "--data", str(small_text)])
    assert result.exit_code == 0, result.output
    header, *rows = [ln.split() for ln in result.output.splitlines()
                     if ln.split() and ln.split()[0] in ("variant", "float32@naive", "peer")]
    assert header[-1] == "peer" and [r[0] for r in rows] == ["float32@naive", "peer"]
    assert rows[1][-1] == "1.00" and float(rows[0][-3].replace(",", "")) > 0  # its tokens/s
    missing = invoke(cli, ["bench", "train", "--peer", str(tmp_path / "nope.py"), "--data",
                           str(small_text)])
    assert missing.exit_code != 0 and "nope.py" in missing.output
    (tmp_path / "bad.py").write_text("x = 1\n")
    bad = invoke(cli, ["bench", "train", "--peer", str(tmp_path / "bad.py"), "--data",
                       str(small_text)])
    assert bad.exit_code == 1
    assert "defines no GPTConfig or GPT; expected nanoGPT's model.py" in bad.output


def test_bench_ops_times_each_layer_kernels_against_pytorch(cli):
    assert "linear_gelu" in invoke(cli, ["bench", "ops", "--help"]).output
    result = invoke(cli, ["bench", "ops", "--batch", "2", "--block", "4", "--n-embd", "8",
                          "--vocab", "5", "--rounds", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "rows = 2 x 4 = 8, C = 8, 4C = 32, V = 5" in lines[0]
    assert lines[1].split() == ["op", "implementation", "time", "ms", "x", "ref"]
    ratios = {(ln[:15].strip(), ln[15:35].strip()): ln.split()[-1] for ln in lines[2:]}
    for op, ref in (("layer_norm", "F.layer_norm"), ("linear_gelu", "F.gelu(linear(x))"),
                    ("cross_entropy", "F.cross_entropy")):
        assert ratios[op, ref] == "1.00"
        assert float(ratios[op, "--kernels native"]) > 0
        assert float(ratios[op, "--kernels torch"]) > 0
    assert float(ratios["linear_gelu", "linear(x) alone"]) > 0
    assert len(ratios) == 10
    bad = invoke(cli, ["bench", "ops", "--ops", "softmax"])
    assert bad.exit_code == 2 and "unknown op(s) softmax" in bad.output


def test_kernels_bench_ops_is_gone(cli):
    assert invoke(cli, ["kernels", "bench-ops"]).exit_code == 2


# ------------------------------------------------------------------ options from the configs
def test_cli_spells_out_no_model_config_field_name():
    """gpt run's options come from the configs' own fields: no ModelConfig field name is a
    string constant of cli.py (no hand-kept list of them)."""
    import ast
    from pathlib import Path

    import attrs

    import gptlab.cli
    from gptlab.core.config import ModelConfig

    source = Path(gptlab.cli.__file__).read_text()
    assert len(source.splitlines()) < 400  # display in console.py, options in options.py
    tree = ast.parse(source)
    fields = attrs.fields_dict(ModelConfig)
    assert sorted({node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                   and isinstance(node.value, str) and node.value in fields}) == []


def test_every_config_flag_is_a_run_option_with_its_help(cli):
    import attrs

    from gptlab.core.config import ModelConfig, TrainConfig

    run = cli.commands["run"]
    params = {p.name: p for p in run.params}
    text = " ".join(invoke(cli, ["run", "--help"]).output.split())
    flagged = [f for cls in (ModelConfig, TrainConfig) for f in attrs.fields(cls)
               if f.metadata.get("flag")]
    assert sorted(o for p in run.params for o in [*p.opts, *p.secondary_opts]) == sorted([
        "--preset", "--data", "--model", "--tokenizer", "--attention", "--kernels", "--matmul", "--block",
        "--norm", "--mlp", "--position", "--qk-norm", "--no-qk-norm", "--untied-head",
        "--tied-head", "--zero-init", "--no-zero-init", "--device", "--seed", "--iters",
        "--batch-size", "--block-size", "--n-layer", "--n-head", "--n-embd", "--dropout", "--lr",
        "--schedule", "--eval-interval", "--sample-tokens", "--out-dir", "--resume",
        "--grad-accum", "--dtype", "--compile", "--no-compile", "--time-budget", "--optimizer",
        "--muon-lr", "--overwrite"])  # the flags before they were generated
    for f in flagged:
        meta = f.metadata
        p = params[f.name]
        assert p.opts[0] == meta["flag"] and p.default is None
        assert p.help == meta["help"] and " ".join(meta["help"].split()) in text
    for name in ("bias", "warmup_iters", "vocab_size", "weight_decay"):  # settings, no flag
        assert name not in params
    assert "--untied-head / --tied-head" in text and "--compile / --no-compile" in text
    assert "--schedule [cosine|wsd]" in text and "--dtype [auto|float32|bfloat16|float16]" in text
    ctx = run.make_context("run", ["--tied-head", "--no-qk-norm", "--compile", "--iters", "3",
                                   "--lr", "0.5", "--dtype", "bfloat16", "--attention", "naive"])
    given = {k: v for k, v in ctx.params.items() if v is not None}
    assert given == {"untied_head": False, "qk_norm": False, "compile": True, "max_iters": 3,
                     "learning_rate": 0.5, "dtype": "bfloat16", "attention": "naive",
                     "preset": "default", "out_dir": "out", "overwrite": False}
    bad = invoke(cli, ["run", "--schedule", "linear"])
    assert bad.exit_code == 2 and "'linear' is not one of 'cosine', 'wsd'" in bad.output


def _events(kind_steps, **kw):
    from gptlab.core.trainer import TrainEvent

    return [TrainEvent(kind, step, 20, loss=2.0, tokens_per_s=1000.0, train_loss=2.5,
                       val_loss=2.25, elapsed=step * 1.0, train_time=step * 0.5, **kw)
            for kind, step in kind_steps]


def test_one_progress_printer_for_steps_and_for_a_time_budget(capsys):
    from gptlab.console import TrainingProgress

    events = _events([("step", 1), ("step", 2), ("step", 4), ("eval", 4), ("step", 6)])
    shown = TrainingProgress(20, tty=False)  # a line every 2 steps, and the first
    for ev in events:
        shown(ev)
    shown.close()
    assert capsys.readouterr().err.splitlines() == [
        "step      1/20  loss 2.000  1,000 tok/s  [1.0s]",
        "step      2/20  loss 2.000  1,000 tok/s  [2.0s]",
        "step      4/20  loss 2.000  1,000 tok/s  [4.0s]",
        "step      4/20  eval: train 2.5000  val 2.2500",
        "step      6/20  loss 2.000  1,000 tok/s  val 2.250  [6.0s]"]
    shown = TrainingProgress(20, budget=10.0, tty=False)  # a line per second of steps
    for ev in events:
        shown(ev)
    assert capsys.readouterr().err.splitlines() == [
        "step      1  loss 2.000  1,000 tok/s  [0.5s of 10.0s of steps, 1.0s in all]",
        "step      4  loss 2.000  1,000 tok/s  [2.0s of 10.0s of steps, 4.0s in all]",
        "step      4  eval: train 2.5000  val 2.2500",
        "step      6  loss 2.000  1,000 tok/s  val 2.250  [3.0s of 10.0s of steps, 6.0s in all]"]


def test_bench_attention_writes_its_table_and_plot(cli, tmp_path):
    md, png = tmp_path / "attention.md", tmp_path / "attention.png"
    result = invoke(cli, ["bench", "attention", "--backends", "naive", "--seq-lens", "16,32",
                          "--reps", "1", "--batch", "1", "--heads", "2", "--out", str(md),
                          "--plot", str(png)])
    assert result.exit_code == 0, result.output
    lines = md.read_text().splitlines()
    assert lines[0].startswith(f"`gpt bench attention --backends naive --seq-lens 16,32 --batch 1 "
                               f"--heads 2 --reps 1 --plot {png} --out {md}`: causal attention")
    rows = [ln.split("|")[1:3] for ln in lines[4:]]
    assert [(b.strip(), t.strip()) for b, t in rows] == [("sdpa", "16"), ("naive", "16"),
                                                         ("sdpa", "32"), ("naive", "32")]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plugins_lists_the_parts_the_ladder_leaves_out(cli):
    result = invoke(cli, ["plugins"])
    assert "    block: prenorm, postnorm, plain, single-head" in result.output
    assert "    norm: layernorm, rmsnorm, none" in result.output
    assert "    MLP: gelu, relu2, swiglu, none" in result.output


def test_the_first_step_shows_no_speed_rather_than_zero(capsys):
    from gptlab.console import TrainingProgress
    from gptlab.core.trainer import TrainEvent

    shown = TrainingProgress(20, tty=False)
    shown(TrainEvent("step", 1, 20, loss=4.758, tokens_per_s=0.0, elapsed=0.2, train_time=0.2))
    assert capsys.readouterr().err.splitlines() == ["step      1/20  loss 4.758  - tok/s  [0.2s]"]


def test_bench_train_ratios_are_medians_of_the_rounds_ratios():
    from gptlab.bench.train import Result, Variant

    a = Result(Variant("a"), None, None, None, "float32", [10.0, 20.0, 40.0])
    b = Result(Variant("b"), None, None, None, "float32", [5.0, 40.0, 20.0])
    assert a.median / b.median == 1.0  # the medians of rounds taken apart hide it
    assert a.ratio_to(b) == 2.0 and a.ratio_to(a) == 1.0
