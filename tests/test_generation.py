"""KV-cache generation and the sampling options."""

import pytest
import torch

from gptlab.core.planning import build_model
from gptlab.core.config import ModelConfig
from gptlab.core.errors import ConfigError
from gptlab.core.generation import sample_next, sample_text
from gptlab.plugins.tokenizers.char import CharTokenizer


def make_model(registry, attention="naive", block_size=16, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=13, block_size=block_size, n_layer=2, n_head=2, n_embd=16,
                      attention=attention)
    model = build_model(registry, cfg, requires_grad=False).eval()
    with torch.no_grad():  # sharper than the 0.02 init, so greedy decoding is not all ties
        for p in model.parameters():
            p.mul_(8)
    return model


def test_greedy_with_cache_is_identical_to_without(registry, backend_name):
    model = make_model(registry, backend_name)
    assert model.kv_cache_usable()
    prompt = torch.tensor([[1, 5, 2], [7, 7, 3]])
    # 60 new tokens with block_size 16: the window slides (cache dropped) several times
    a = model.generate(prompt, 60, temperature=0, use_cache=False)
    b = model.generate(prompt, 60, temperature=0, use_cache=True)
    assert a.shape == (2, 63)
    assert torch.equal(a, b)
    assert len(set(a[0, 3:].tolist())) > 2  # a non-trivial sequence


@torch.no_grad()
def test_cached_logits_match_full_forward(registry):
    model = make_model(registry, "naive")
    idx = torch.randint(0, 13, (2, 12))
    full, _ = model(idx)
    cache = model.new_cache()
    first = model.forward_cached(idx[:, :5], cache)
    steps = [model.forward_cached(idx[:, t:t + 1], cache) for t in range(5, 12)]
    got = torch.cat([first, *steps], dim=1)
    assert torch.allclose(got, full, rtol=1e-4, atol=1e-3)  # weights x8 amplify rounding
    with pytest.raises(ConfigError, match="more than block_size"):
        model.forward_cached(idx[:, :5], cache)


def test_backend_without_decode_support_is_not_used_for_decoding(registry):
    from gptlab.plugins.attention.naive import NaiveAttention

    class NoDecode(NaiveAttention):
        name = "nodecode"
        supports_q_shorter_than_k = False
        calls = []

        def forward(self, q, k, v, **kw):
            assert q.size(-2) == k.size(-2), "asked to decode"
            return super().forward(q, k, v, **kw)

    model = make_model(registry, "naive")
    for block in model.blocks:
        block.attn.attention = NoDecode()
    model.attention_backend = NoDecode()
    assert not model.kv_cache_usable()
    out = model.generate(torch.tensor([[1]]), 20, temperature=0, use_cache=True)
    assert out.shape == (1, 21)


def test_sampling_options():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0).item() == 0
    # top_p small: only the likeliest token survives
    assert {sample_next(logits, 1.0, top_p=0.1, generator=gen).item() for _ in range(50)} == {0}
    # top_k=2: only the two likeliest
    assert {sample_next(logits, 1.0, top_k=2, generator=gen).item() for _ in range(200)} == {0, 1}
    # top_p=0.8: mass of [0.61, 0.22, ...]: tokens 0 and 1 reach 0.8
    seen = {sample_next(logits, 1.0, top_p=0.8, generator=gen).item() for _ in range(300)}
    assert seen == {0, 1}
    assert {sample_next(logits, 1.0, generator=gen).item() for _ in range(500)} == {0, 1, 2, 3}


def test_generate_validates_options(registry):
    model = make_model(registry)
    idx = torch.tensor([[1]])
    for kw, msg in [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"),
                    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")]:
        with pytest.raises(ConfigError, match=msg):
            model.generate(idx, 1, **kw)


def test_stop_string_seed_and_streaming(registry):
    tok = CharTokenizer()
    tok.train("abcdefghijklm")
    model = make_model(registry)
    streamed = []
    full = sample_text(model, tok, "ab", 200, temperature=0, on_text=streamed.append)
    assert full == "ab" + "".join(streamed) and len(full) == 202
    stop = full[10:12]  # a string greedy decoding is known to produce
    cut = sample_text(model, tok, "ab", 200, temperature=0, stop=stop)
    assert cut.endswith(stop) and stop not in cut[:-1] and len(cut) < len(full)
    a = sample_text(model, tok, "ab", 50, seed=3, top_p=0.9)
    assert a == sample_text(model, tok, "ab", 50, seed=3, top_p=0.9)
