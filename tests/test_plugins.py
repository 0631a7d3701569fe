"""Plugin loading: entry points, broken plugins, conflicts, the example third-party plugin."""

import logging

import pytest
import torch
from click.testing import CliRunner

from conftest import EXAMPLE_PLUGIN, make_dist, write_module
from gptlab.cli import build_cli
from gptlab.core import hookspecs
from gptlab.core.checkpoint import load_model
from gptlab.core.planning import build_model
from gptlab.core.config import ModelConfig
from gptlab.core.errors import PluginError
from gptlab.core.plugins import load_registry


def test_builtins_come_from_entry_points(registry):
    names = {p.name for p in registry.plugins}
    assert {"char", "models", "attention", "cuda_kernels"} <= names
    assert all(p.source.startswith("entry point") for p in registry.plugins
               if p.name in {"char", "models", "attention", "cuda_kernels"})
    assert set(registry.tokenizers) >= {"char"}
    assert set(registry.models) >= {"bigram", "transformer"}
    assert set(registry.blocks) >= {"prenorm", "postnorm"}
    assert set(registry.attention_backends) >= {"naive", "sdpa"}
    assert registry.owners[("attention_backends", "naive")] == "attention"


def test_registry_is_fresh_each_time():
    a, b = load_registry(), load_registry()
    assert a.pm is not b.pm
    a.attention_backends["x"] = object
    assert "x" not in b.attention_backends


def test_every_hook_has_a_docstring():
    specs = [n for n in dir(hookspecs) if n.startswith("register_")]
    assert set(specs) == {"register_tokenizers", "register_models", "register_blocks",
                          "register_attention_backends", "register_layer_kernels",
                          "register_matmuls", "register_decoders", "register_norms", "register_mlps", "register_positions",
                          "register_optimizers", "register_commands"}
    for name in specs:
        assert len(getattr(hookspecs, name).__doc__.strip()) > 20


def test_example_plugin_found_through_its_entry_point(tmp_path, monkeypatch):
    """The example package, 'installed' as pip would (a dist-info with its entry point)."""
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN))
    monkeypatch.syspath_prepend(str(make_dist(tmp_path, "gptlab_example_plugin",
                                              {"example": "gptlab_example_plugin"})))
    reg = load_registry()
    info = next(p for p in reg.plugins if p.name == "example")
    assert "gptlab_example_plugin" in info.source
    assert info.registered == {"attention backend": ["chunked"], "block": ["parallel"],
                               "norm": ["scalenorm"], "MLP": ["geglu"]}
    cfg = ModelConfig(vocab_size=11, block_size=70, n_layer=2, n_head=2, n_embd=16,
                      block="parallel", attention="chunked")
    torch.manual_seed(0)
    model = build_model(reg, cfg)
    assert type(model.blocks[0]).__name__ == "ParallelBlock"
    idx = torch.randint(0, 11, (2, 70))
    logits, loss = model(idx, idx)
    loss.backward()
    # chunked attention (3 chunks of <= 32 queries) equals the naive backend exactly enough
    model_naive = build_model(reg, ModelConfig(**{**cfg.to_dict(), "attention": "naive"}))
    model_naive.load_state_dict(model.state_dict())
    assert torch.allclose(model_naive(idx)[0], model(idx)[0], atol=1e-5)
    # and its command is on the CLI
    result = CliRunner().invoke(build_cli(reg), ["example-hello"])
    assert result.exit_code == 0 and "hello from gptlab-example-plugin" in result.output
    result = CliRunner().invoke(build_cli(reg), ["plugins"])
    assert "example" in result.output and "attention backend: chunked" in result.output
    # and `gpt run` trains with its block, backend, norm and MLP (its loss falls)
    data = tmp_path / "text.txt"
    data.write_text("Prince Andrew looked at Pierre. The old prince was silent. " * 60)
    result = CliRunner().invoke(build_cli(reg), [
        "run", "--preset", "tiny", "--data", str(data), "--iters", "60", "--block-size", "16",
        "--block", "parallel", "--attention", "chunked", "--norm", "scalenorm", "--mlp",
        "geglu", "--eval-interval", "30", "--sample-tokens", "0", "--out-dir",
        str(tmp_path / "run")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "attention chunked" in result.output
    model = load_model(reg, tmp_path / "run")[0]
    assert {type(m).__name__ for m in model.modules()} >= {"ParallelBlock", "ScaleNorm", "GEGLU"}
    vals = [float(ln.split("val ")[1]) for ln in result.output.splitlines() if "eval: " in ln]
    assert vals[-1] < vals[0] < 3.5


def test_broken_plugin_is_a_warning_and_the_cli_keeps_working(tmp_path, monkeypatch, caplog):
    site = make_dist(tmp_path, "broken_plugin", {"broken": "broken_plugin_mod"})
    write_module(site, "broken_plugin_mod", "raise ImportError('missing dependency foo')\n")
    monkeypatch.syspath_prepend(str(site))
    with caplog.at_level(logging.WARNING):
        reg = load_registry()
    problem = ("plugin 'broken' (broken_plugin_mod (broken_plugin 0.1.0)) failed to import: "
               "ImportError: missing dependency foo")
    assert reg.problems == [problem]
    assert caplog.text == ""  # recorded, not logged: the CLI shows it, once per command
    assert "naive" in reg.attention_backends  # everything else still loaded
    result = CliRunner().invoke(build_cli(reg), ["plugins"])
    assert result.exit_code == 0
    assert result.stdout.count(f"WARNING: {problem}") == 1 and result.stderr == ""
    result = CliRunner().invoke(build_cli(reg), ["backends"])
    assert result.exit_code == 0 and "sdpa" in result.stdout
    assert result.stderr == f"WARNING: {problem}\n"


def test_hook_that_raises_and_bad_returns_are_blamed_on_their_plugin(tmp_path, monkeypatch):
    site = make_dist(tmp_path, "bad_hooks", {"badhooks": "bad_hooks_mod"})
    write_module(site, "bad_hooks_mod", """
        from gptlab import hookimpl
        @hookimpl
        def register_models():
            raise RuntimeError("boom")
        @hookimpl
        def register_blocks():
            return [int]
        @hookimpl
        def register_commands(cli):
            raise RuntimeError("no commands today")
    """)
    monkeypatch.syspath_prepend(str(site))
    reg = load_registry()
    joined = "\n".join(reg.problems)
    assert "plugin 'badhooks': register_models() raised RuntimeError: boom" in joined
    assert "not a Block subclass" in joined
    cli = build_cli(reg)
    assert "no commands today" in "\n".join(reg.problems)
    result = CliRunner().invoke(cli, ["backends"])
    assert result.exit_code == 0


def test_two_plugins_registering_one_name_is_an_error_naming_both(tmp_path, monkeypatch):
    site = make_dist(tmp_path, "dupe", {"dupe": "dupe_mod"})
    write_module(site, "dupe_mod", """
        from gptlab import hookimpl
        from gptlab.plugins.attention.naive import NaiveAttention
        class MyNaive(NaiveAttention):
            pass
        @hookimpl
        def register_attention_backends():
            return MyNaive
    """)
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(PluginError) as e:
        load_registry()
    msg = str(e.value)
    assert "'naive'" in msg and "'attention'" in msg and "'dupe'" in msg
    # the CLI still starts and reports it as one line
    result = CliRunner().invoke(build_cli(), ["backends"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("Error: attention backend 'naive' is registered by")
    assert CliRunner().invoke(build_cli(), ["--help"]).exit_code == 0


def test_in_process_plugin_without_entry_points():
    import types

    from gptlab import hookimpl
    from gptlab.plugins.tokenizers.char import CharTokenizer

    class Upper(CharTokenizer):
        name = "upper"

    mod = types.SimpleNamespace(register_tokenizers=hookimpl(lambda: Upper))
    reg = load_registry([("mine", mod)], entry_points=False)
    assert list(reg.tokenizers) == ["upper"]
    assert reg.plugins[0].source == "in-process"
    with pytest.raises(PluginError, match="already taken"):
        load_registry([("char", mod)])
