"""The KV cache's storage (:class:`gptlab.nn.LayerKV`) and cached generation around it."""

import pytest
import torch

from gptlab.core.attention import AttentionRequest
from gptlab.nn import LayerKV
from test_generation import make_model


def kv(T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, T, 4, generator=g), torch.randn(2, 3, T, 4, generator=g)


@pytest.mark.parametrize("max_len", [None, 4, 16])
def test_layer_kv_returns_everything_appended_so_far(max_len):
    cache = LayerKV(max_len)
    assert cache.length == 0 and cache.k is None and cache.v is None
    ks, vs, seen = [], [], []
    for step, T in enumerate([3, 1, 1, 2, 1, 5, 1]):  # a prompt, then steps; past max_len 4
        k, v = kv(T, step)
        ks.append(k)
        vs.append(v)
        got_k, got_v = cache.extend(k, v)
        seen.append((got_k, got_v, torch.cat(ks, dim=2), torch.cat(vs, dim=2)))
        assert cache.length == got_k.size(2) == sum(t.size(2) for t in ks)
        assert torch.equal(got_k, torch.cat(ks, dim=2)) and torch.equal(got_v, torch.cat(vs, 2))
        assert torch.equal(cache.k, got_k) and torch.equal(cache.v, got_v)
    for got_k, got_v, want_k, want_v in seen:  # views handed out earlier are never overwritten
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


def test_layer_kv_storage_is_allocated_once_within_max_len():
    cache = LayerKV(max_len=8)
    k, v = kv(3, 0)
    first_k, _ = cache.extend(k, v)
    for step in range(5):  # fills all 8 slots: the same storage throughout
        got_k, got_v = cache.extend(*kv(1, step + 1))
        assert got_k.data_ptr() == first_k.data_ptr()
        assert got_k.shape == got_v.shape == (2, 3, 4 + step, 4)
    assert cache.length == 8
    before = cache.k.clone()
    got_k, _ = cache.extend(*kv(1, 9))  # one past max_len: new storage, the past copied over
    assert got_k.data_ptr() != first_k.data_ptr() and cache.length == 9
    assert torch.equal(got_k[:, :, :8], before)


def test_cache_storage_spans_the_window_and_is_rebuilt_when_it_slides(registry):
    model = make_model(registry, "naive", block_size=16)
    caches = []
    new_cache = model.new_cache

    def spy():
        caches.append(new_cache())
        return caches[-1]

    model.new_cache = spy
    prompt = torch.tensor([[1, 5, 2]])
    out = model.generate(prompt, 40, temperature=0, use_cache=True)
    assert torch.equal(out, model.generate(prompt, 40, temperature=0, use_cache=False))
    # 3 + 40 tokens, block_size 16: the window jumps (keeping 8 tokens) at 17, 26 and 35 tokens
    assert len(caches) == 4
    for cache in caches:
        assert all(layer._k.size(2) == 16 for layer in cache.layers)  # never grown past it
        assert cache.length <= 16


@pytest.mark.parametrize("attention", ["naive", "sdpa", "flash"])
def test_cached_greedy_matches_uncached_from_a_long_prompt_and_when_stopped(registry,
                                                                          attention):
    cls = registry.attention_backends.get(attention)
    req = AttentionRequest(device="cpu", head_dim=8, q_len=1, k_len=16, requires_grad=False)
    if cls is None or cls.not_supported_reasons(req):
        pytest.skip(f"the {attention} backend cannot run here")
    model = make_model(registry, attention, block_size=16)
    prompt = torch.randint(0, 13, (2, 20), generator=torch.Generator().manual_seed(1))
    a = model.generate(prompt, 30, temperature=0, use_cache=False)  # the prompt alone is
    b = model.generate(prompt, 30, temperature=0, use_cache=True)   # past block_size
    assert a.shape == (2, 50) and torch.equal(a, b) and torch.equal(a[:, :20], prompt)
    steps = []

    def stop_after_7(nxt):
        steps.append(nxt)
        return len(steps) < 7

    c = model.generate(prompt, 30, temperature=0, use_cache=True, on_token=stop_after_7)
    assert c.shape == (2, 27) and torch.equal(c, a[:, :27])
    assert torch.equal(torch.cat(steps, dim=1), a[:, 20:27])
