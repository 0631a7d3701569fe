"""The ladder from the bigram to GPT: its rungs as configurations, and `gpt ladder` itself."""

import json
import os
import signal

import attrs
import pytest
import torch
from click.testing import CliRunner

from gptlab.cli import build_cli
from gptlab.core.config import ModelConfig, TrainConfig, resolve_configs
from gptlab.core.planning import build_model
from gptlab.lab import ladder
from gptlab.lab.ladder import RUNGS, Budget, base_of

SMALL = ("Prince Andrew looked at Pierre. The old prince was silent, and Natasha laughed.\n"
         * 60)


def rung(name):
    return next(r for r in RUNGS if r.name == name)


def settings_of(r):
    """Every field of a rung's ModelConfig and TrainConfig, by name."""
    m, t = r.configs()
    return {**m.to_dict(), **t.to_dict()}


def changed(a, b):
    sa, sb = settings_of(a), settings_of(b)
    return {k for k in sa if sa[k] != sb[k]}


# --------------------------------------------------------------------------- the rungs
def test_the_ladder_climbs_in_the_founding_order():
    assert [r.name for r in RUNGS] == ["bigram", "head", "heads", "mlp", "residual", "layernorm",
                                       "gpt", "naive", "fused", "flash", "speedrun"]


@pytest.mark.parametrize("r", [r for r in RUNGS if r.changes is not None], ids=lambda r: r.name)
def test_each_rung_differs_from_the_one_before_by_exactly_its_named_part(r):
    assert changed(r, base_of(r)) == set(r.changes), r.adds


def test_the_changes_are_the_founding_parts():
    parts = {r.name: set(r.changes) for r in RUNGS if r.changes is not None}
    assert parts == {
        "heads": {"block", "n_head"},  # single-head -> plain multi-head (concat + projection)
        "mlp": {"mlp"},  # none -> gelu
        "residual": {"block", "n_layer"},  # plain -> prenorm, 1 -> 4 blocks
        "layernorm": {"norm"},  # none -> layernorm
        "gpt": {"n_embd"},  # scale: 96 -> 192
        "naive": {"attention"}, "fused": {"attention"}, "flash": {"attention"},
    }
    for name, before, after in [("heads", "single-head", "plain"), ("mlp", "none", "gelu"),
                                ("residual", "plain", "prenorm"),
                                ("layernorm", "none", "layernorm")]:
        field = {"heads": "block", "mlp": "mlp", "residual": "block", "layernorm": "norm"}[name]
        assert (settings_of(base_of(rung(name)))[field], settings_of(rung(name))[field]) == \
            (before, after)


def test_the_gpt_rung_is_exactly_the_default_preset_and_the_ends_are_their_presets():
    model, train = resolve_configs("default", {}, {})
    assert rung("gpt").configs() == (model, train)  # every field, the training settings too
    assert isinstance(model, ModelConfig) and isinstance(train, TrainConfig)
    assert rung("bigram").configs() == resolve_configs("bigram", {}, {})
    assert rung("speedrun").configs() == resolve_configs("speedrun", {}, {})
    assert rung("gpt").command() == "--preset default"


def test_the_first_transformer_rung_leaves_every_later_part_out():
    m, t = rung("head").configs()
    assert (m.model, m.block, m.n_layer, m.n_head, m.norm, m.mlp) == \
        ("transformer", "single-head", 1, 1, "none", "none")
    assert rung("bigram").configs()[0].model == "bigram"


def test_transformer_rungs_train_alike_same_seed_batches_and_schedule():
    default_train = resolve_configs("default", {}, {})[1]
    for name in ["head", "heads", "mlp", "residual", "layernorm", "gpt", "naive", "fused",
                 "flash"]:
        m, t = rung(name).configs()
        assert t == default_train and m.block_size == 128, name


def test_a_budget_is_steps_or_seconds_and_the_bigram_keeps_its_own():
    m, t = rung("mlp").configs(Budget(iters=7))
    assert (t.max_iters, t.time_budget) == (7, 0.0)
    m, t = rung("speedrun").configs(Budget(seconds=5))
    assert (t.time_budget, t.schedule, t.optimizer) == (5.0, "wsd", "muon")
    assert t.max_iters >= 100_000
    assert rung("bigram").configs(Budget(iters=7), device="cpu") == \
        resolve_configs("bigram", {}, {})
    for bad in [dict(), dict(seconds=5, iters=7)]:
        with pytest.raises(Exception, match="--budget SECONDS or --iters STEPS"):
            Budget(**bad)


def test_command_lines_name_the_settings():
    assert rung("head").command() == ("--preset default --n-layer 1 --n-head 1 --n-embd 96 "
                                      "--block single-head --norm none --mlp none")
    assert ladder.flags({"qk_norm": True, "untied_head": False, "learning_rate": 0.002}) == \
        ["--qk-norm", "--tied-head", "--lr 0.002"]


@pytest.mark.parametrize("r", [r for r in RUNGS if r.name not in ("fused", "flash")],
                         ids=lambda r: r.name)
def test_every_rung_is_a_model_of_registered_parts_that_trains(registry, r):
    m, _ = r.configs()
    m = attrs.evolve(m, vocab_size=11, block_size=16)
    torch.manual_seed(0)
    model = build_model(registry, m)
    assert type(model).__name__ == {"bigram": "BigramLanguageModel"}.get(r.name, "Transformer")
    idx, targets = torch.randint(0, 11, (2, 3, 16))
    _, loss = model(idx, targets)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters())


def test_rungs_are_chosen_by_name_in_ladder_order():
    assert [r.name for r in ladder.choose("mlp,bigram")] == ["bigram", "mlp"]
    with pytest.raises(Exception, match="unknown rung.*'?nope'?.*the rungs are bigram, head"):
        ladder.choose("bigram,nope")


# --------------------------------------------------------------------------- gpt ladder
@pytest.fixture
def small_text(tmp_path):
    p = tmp_path / "small.txt"
    p.write_text(SMALL)
    return p


def test_gpt_ladder_trains_tabulates_plots_and_skips_finished_rungs(registry, small_text,
                                                                    tmp_path):
    cli, runner = build_cli(registry), CliRunner()
    out = tmp_path / "ladder"
    args = ["ladder", "--rungs", "bigram,head", "--iters", "3", "--data", str(small_text),
            "--out-dir", str(out), "--sample-chars", "20"]
    first = runner.invoke(cli, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "| bigram | a table of next-character logits" in first.output
    for name in ["bigram", "head"]:
        assert (out / name / "ckpt.pt").is_file() and (out / name / "rung.json").is_file()
    table = (out / "ladder.md").read_text()
    assert table.startswith("`gpt ladder --rungs bigram,head --iters 3")
    assert (out / "ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    head = json.loads((out / "head" / "rung.json").read_text())
    bigram = json.loads((out / "bigram" / "rung.json").read_text())
    assert (head["steps"], bigram["steps"]) == (3, 2000)  # the bigram: its own 2000 steps
    assert bigram["val_loss"] < head["val_loss"]  # 3 steps of a transformer learn ~nothing
    # the table's loss is `gpt eval`'s: the whole val split
    ev = runner.invoke(cli, ["eval", str(out / "head")], catch_exceptions=False)
    assert f"loss {head['val_loss']:.4f}" in ev.output
    assert f"{head['val_loss']:.4f}" in table
    # a rerun trains nothing and writes the same table
    mtime = (out / "head" / "ckpt.pt").stat().st_mtime_ns
    again = runner.invoke(cli, args, catch_exceptions=False)
    assert again.exit_code == 0 and again.output.count("skipped") == 2
    assert (out / "head" / "ckpt.pt").stat().st_mtime_ns == mtime
    # another budget in the same folder is refused, and nothing is overwritten
    other = runner.invoke(cli, [*args[:4], "5", *args[5:]])
    assert other.exit_code == 1
    assert other.output.strip() == (f"Error: {out / 'head'} holds rung head trained with other "
                                    f"settings (max_iters 3 here, 5 asked); rerun with those, "
                                    f"or pick another --out-dir")
    assert json.loads((out / "head" / "rung.json").read_text()) == head


def test_an_interrupted_rung_is_saved_and_resumed_by_the_next_ladder(registry, small_text,
                                                                     tmp_path):
    out = tmp_path / "ladder"
    r, budget = rung("head"), Budget(iters=6)

    def interrupt_at_step_2(event):
        if event.kind == "step" and event.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the trainer saves after this step

    with pytest.raises(ladder.LadderInterrupted, match="after step 2.*rerun the same `gpt "
                                                       "ladder` to go on") as e:
        ladder.run_rung(registry, r, budget, out, data=str(small_text), sample_chars=0,
                        on_event=interrupt_at_step_2)
    assert e.value.exit_code == 130
    assert not (out / "head" / ladder.RESULT).exists()
    stages = []
    result = ladder.run_rung(registry, r, budget, out, data=str(small_text), sample_chars=0,
                             on_stage=lambda what, value: stages.append((what, value)))
    assert ("resumed", 2) in stages and result.steps == 6
    # the same losses as a ladder that was never interrupted
    whole = ladder.run_rung(registry, r, budget, tmp_path / "whole", data=str(small_text),
                            sample_chars=0)
    assert whole.val_loss == pytest.approx(result.val_loss, abs=1e-6)


def test_a_rung_folder_of_other_settings_is_refused(registry, small_text, tmp_path):
    out = tmp_path / "ladder"
    ladder.run_rung(registry, rung("head"), Budget(iters=2), out, data=str(small_text),
                    sample_chars=0)
    (out / "head" / ladder.RESULT).unlink()  # unfinished, as if scoring never ran
    with pytest.raises(Exception, match="holds a run of other settings than rung head on this "
                                        "budget \\(max_iters 2 here, 4 asked\\)"):
        ladder.run_rung(registry, rung("head"), Budget(iters=4), out, data=str(small_text))


def test_gpt_ladder_options_are_checked_before_any_work(registry, tmp_path):
    cli, runner = build_cli(registry), CliRunner()
    for args, message in [(["--budget", "5", "--iters", "3"], "give --budget or --iters, not "
                                                              "both"),
                          (["--rungs", "gpt,tall"], "unknown rung(s) tall")]:
        result = runner.invoke(cli, ["ladder", "--out-dir", str(tmp_path / "x"), *args])
        assert result.exit_code != 0 and message in result.output
        assert not (tmp_path / "x").exists()


def test_matplotlib_missing_is_one_line_before_training(registry, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = CliRunner().invoke(build_cli(registry), ["ladder", "--out-dir",
                                                      str(tmp_path / "x")])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: gpt ladder draws with matplotlib: pip install "
                                     "'gptlab[plot]'")
    assert not (tmp_path / "x").exists()


def test_train_config_budget_fields_exist():
    # the ladder's budgets are TrainConfig's own fields, not settings of its own
    assert {"max_iters", "time_budget"} <= set(attrs.fields_dict(TrainConfig))


def test_the_docs_list_every_rung_as_it_is_defined():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "ladder.md").read_text()
    for r in RUNGS:
        assert f"| `{r.name}` | {r.adds} | `{r.command()}` |" in text, r.name
