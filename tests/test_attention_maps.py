"""Attention maps (`gpt attention`): the weights drawn are the ones each backend computes."""

import pytest
import torch
from click.testing import CliRunner

from gptlab.cli import build_cli
from gptlab.core.config import ModelConfig
from gptlab.core.planning import build_model
from gptlab.lab.attention_maps import attention_maps, attention_modules
from gptlab.nn import attention_weights
from gptlab.plugins.tokenizers.char import CharTokenizer

TEXT = "Prince Andrew looked at Pierre. The old prince was silent.\n"


@pytest.fixture(scope="module")
def tokenizer():
    tok = CharTokenizer()
    tok.train(TEXT)
    return tok


def check_causal_weights(w: torch.Tensor) -> None:
    """Each row sums to 1 over the keys it may see; every entry above the diagonal is 0."""
    T = w.size(-1)
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-5)
    above = torch.ones(T, T, dtype=torch.bool).triu(1)
    assert torch.all(w[..., above] == 0)
    assert torch.all(w[..., ~above] > 0)  # a softmax: every allowed key keeps some weight


@pytest.mark.parametrize("parts", [dict(), dict(position="rotary", qk_norm=True),
                                   dict(block="postnorm")], ids=["gpt2", "rotary+qknorm",
                                                                 "postnorm"])
def test_the_maps_are_the_weights_each_backend_applies(registry, tokenizer, backend_name,
                                                       parts):
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2,
                      n_embd=16, attention=backend_name, **parts)
    torch.manual_seed(0)
    model = build_model(registry, cfg).eval()
    prompt = "Pierre looked at the old prince."
    found = attention_maps(model, tokenizer, prompt)
    assert found.names == ["blocks.0.attn", "blocks.1.attn"]
    assert found.tokens == list(prompt)
    seen = {}  # what each attention module received and returned, run by the backend
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(
        name, (args[0], out))) for name, m in attention_modules(model)]
    with torch.no_grad():
        model(torch.tensor([tokenizer.encode(prompt)]))
    for h in hooks:
        h.remove()
    for name, w in zip(found.names, found.maps):
        assert w.shape == (2, len(prompt), len(prompt))
        check_causal_weights(w)
        mha = model.get_submodule(name)
        x, out = seen[name]
        with torch.no_grad():
            _, _, v = mha.qkv(x)  # (1, nh, T, hs)
            y = (w.unsqueeze(0) @ v).transpose(1, 2).reshape(x.shape)  # the heads, concatenated
            assert torch.allclose(mha.c_proj(y), out, atol=1e-5)  # what the backend computed


def test_the_single_head_block_draws_one_head_per_layer(registry, tokenizer):
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2, n_head=1,
                      n_embd=16, block="single-head", norm="none", mlp="none",
                      attention="naive")
    torch.manual_seed(0)
    model = build_model(registry, cfg)
    found = attention_maps(model, tokenizer, "the old prince")
    assert [w.shape for w in found.maps] == [(1, 14, 14)] * 2
    for w in found.maps:
        check_causal_weights(w)
    assert model.training  # left as it was


def test_the_written_out_weights_match_the_formula():
    q, k = torch.randn(2, 3, 5, 4, dtype=torch.float64), torch.randn(2, 3, 5, 4,
                                                                   dtype=torch.float64)
    w = attention_weights(q, k)
    for i in range(5):
        s = (q[..., i:i + 1, :] @ k[..., : i + 1, :].transpose(-2, -1)).squeeze(-2)  # (2, 3, i+1)
        expect = torch.softmax(s / 2.0, dim=-1)  # scale 1/sqrt(head_dim 4)
        assert torch.allclose(w[..., i, : i + 1], expect, atol=1e-12)
        assert torch.all(w[..., i, i + 1:] == 0)


def test_prompts_and_models_that_cannot_be_drawn_are_one_line_errors(registry, tokenizer):
    torch.manual_seed(0)
    model = build_model(registry, ModelConfig(vocab_size=tokenizer.vocab_size, block_size=8,
                                              n_layer=1, n_head=2, n_embd=8,
                                              attention="naive"))
    with pytest.raises(Exception, match="the prompt is 9 tokens long; this model sees at most "
                                        "8 \\(its block size\\): shorten --prompt"):
        attention_maps(model, tokenizer, "Pierre. a")
    with pytest.raises(Exception, match="the prompt is empty"):
        attention_maps(model, tokenizer, "")
    bigram = build_model(registry, ModelConfig(model="bigram", vocab_size=tokenizer.vocab_size))
    with pytest.raises(Exception, match="the bigram model has no attention to draw"):
        attention_maps(bigram, tokenizer, "Pierre")


def test_gpt_attention_draws_what_it_computed(registry, tmp_path, monkeypatch):
    text = tmp_path / "small.txt"
    text.write_text(TEXT * 40)
    cli, runner = build_cli(registry), CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(cli, ["run", "--preset", "tiny", "--data", str(text), "--iters", "5",
                                 "--n-layer", "2", "--n-head", "2", "--n-embd", "16",
                                 "--block-size", "32", "--sample-tokens", "0", "--out-dir",
                                 str(run)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    drawn = {}
    import gptlab.plot

    real = gptlab.plot.plot_attention

    def spy(tokens, names, maps, out_path, title=""):
        drawn.update(tokens=tokens, names=names, maps=maps)
        return real(tokens, names, maps, out_path, title)

    monkeypatch.setattr(gptlab.plot, "plot_attention", spy)
    png = tmp_path / "attn.png"
    result = runner.invoke(cli, ["attention", str(run), "--prompt", "The old prince",
                                 "--out", str(png)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {png}: 2 layer(s), 4 head(s) over 14 characters\n"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn["tokens"] == list("The old prince")
    for layer in drawn["maps"]:
        check_causal_weights(torch.tensor(layer))
    bad = runner.invoke(cli, ["attention", str(run), "--prompt", "Ω", "--out", str(png)])
    assert bad.exit_code == 1 and bad.output.startswith("Error: ") and \
        len(bad.output.strip().splitlines()) == 1
