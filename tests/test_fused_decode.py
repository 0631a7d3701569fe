"""The fused decoding step (csrc/cpu/decode.c): one C call per decoded token for the whole
model, checked against the same model run module by module, and greedy generation against
generation without the cache."""

import pytest
import torch

from gptlab import DecodeRequest
from gptlab.core.config import ModelConfig
from gptlab.core.planning import build_model, choose_components
from gptlab.plugins.cuda_kernels import decode
from gptlab.plugins.cuda_kernels.loader import KernelError, load


def config(*, bias=True, block_size=16, **parts):
    return ModelConfig(vocab_size=13, block_size=block_size, n_layer=2, n_head=3, n_embd=24,
                       bias=bias, attention=parts.pop("attention", "flash"),
                       kernels=parts.pop("kernels", "native"), **parts)


def make_model(registry, *, sharpen=8.0, seed=0, **parts):
    torch.manual_seed(seed)
    cfg = config(**parts)
    model = build_model(registry, cfg, requires_grad=False).eval()
    with torch.no_grad():  # sharper than the 0.02 init, so greedy decoding is not all ties
        for p in model.parameters():
            p.mul_(sharpen)
    return model


PARTS = {  # the default preset's parts, without biases, and the speedrun's (and each alone)
    "gpt2": dict(), "no-bias": dict(bias=False),
    "speedrun": dict(position="rotary", qk_norm=True, mlp="relu2", norm="rmsnorm"),
    "rotary": dict(position="rotary"), "qk-norm": dict(qk_norm=True), "relu2": dict(mlp="relu2"),
    "rmsnorm": dict(norm="rmsnorm", bias=False), "nope": dict(position="none"),
}


@pytest.mark.parametrize("parts", PARTS.values(), ids=PARTS.keys())
@torch.inference_mode()
def test_fused_step_matches_the_blocks_one_by_one(registry, parts):
    """Logits of every step and the cached keys/values: the fused step's max error against a
    float64 run of the same weights is within 2x that of the modules' own float32 run (plus 2
    float32 ulps of the largest value). Weights at 4x the init: sharper ones amplify each
    path's rounding chaotically from step to step."""
    model = make_model(registry, sharpen=4.0, **parts)
    ref = make_model(registry, attention="naive", kernels="torch", **parts).double()
    ref.load_state_dict(model.state_dict())
    idx = torch.randint(0, 13, (2, 16), generator=torch.Generator().manual_seed(1))
    fused, plain, exact = model.new_cache(), model.new_cache(), ref.new_cache()
    assert isinstance(fused.decoder, decode.FusedDecoder)
    plain.decoder = None
    calls = []
    fused.decoder = spy(fused.decoder, calls)
    def within_2x(got, base, want):
        err, base_err = (got.double() - want).abs().max(), (base.double() - want).abs().max()
        ulp = torch.finfo(torch.float32).eps * want.abs().max()
        assert err <= 2 * base_err + 2 * ulp, (err, base_err)

    logits = [[], [], []]
    for t in range(16):  # t = 0: a 1-token prompt, so the step allocates the cache itself
        step = idx[:, t:t + 1]
        for out, m, cache in zip(logits, (model, model, ref), (fused, plain, exact)):
            out.append(m.forward_cached(step, cache))
    within_2x(*(torch.cat(out, dim=1) for out in logits))
    assert len(calls) == 16 and all(y is not None for y in calls)
    for lf, lp, le in zip(fused.layers, plain.layers, exact.layers):
        assert lf.length == lp.length == 16
        within_2x(lf.k, lp.k, le.k)
        within_2x(lf.v, lp.v, le.v)


def spy(decoder, calls):
    def step(x, cache):
        y = decoder(x, cache)
        calls.append(y)
        return y
    return step


@pytest.mark.parametrize("parts", [PARTS["gpt2"], PARTS["speedrun"]], ids=["gpt2", "speedrun"])
def test_greedy_generation_with_the_fused_step_equals_generation_without_cache(registry, parts,
                                                                              monkeypatch):
    model = make_model(registry, seed=2, **parts)  # a seed whose greedy text is not a loop
    calls = []
    real = decode.FusedDecoder.__call__
    monkeypatch.setattr(decode.FusedDecoder, "__call__",
                        lambda self, x, cache: calls.append(1) or real(self, x, cache))
    prompt = torch.tensor([[3, 9, 0, 11], [2, 4, 6, 8]])
    # 60 new tokens with block_size 16: the window slides (a new cache) several times
    a = model.generate(prompt, 60, temperature=0, use_cache=False)
    b = model.generate(prompt, 60, temperature=0, use_cache=True)
    assert torch.equal(a, b)
    assert all(len(set(row[4:].tolist())) > 2 for row in a)  # not a trivial sequence
    assert len(calls) > 40  # the steps after each window's first went through the fused step


@pytest.mark.parametrize("parts, reason", [
    (dict(mlp="swiglu"), "mlp 'swiglu' is not gelu or relu2"),
    (dict(block="postnorm"), "block 'postnorm' is not prenorm"),
    (dict(attention="sdpa"), "attention 'sdpa' is not the flash backend"),
    (dict(kernels="torch"), "layer kernels 'torch' are not native"),
])
def test_other_parts_decode_op_by_op(registry, parts, reason):
    cfg = config(**parts)
    request = DecodeRequest(model=registry.model("transformer"), config=cfg,
                            components=choose_components(registry, cfg))
    assert any(reason in r for r in decode.FusedDecoder.not_supported_reasons(request))
    model = make_model(registry, **parts)
    assert model.decoder is None and model.new_cache().decoder is None
    prompt = torch.tensor([[1, 5, 2]])
    assert torch.equal(model.generate(prompt, 20, temperature=0, use_cache=False),
                       model.generate(prompt, 20, temperature=0, use_cache=True))


def test_fused_step_declines_with_gradients_or_in_training(registry):
    model = make_model(registry)
    cache = model.new_cache()
    idx = torch.tensor([[3]])
    model.blocks[0].ln_1.weight.requires_grad_(True)
    assert cache.decoder(idx, cache) is None  # autograd wants the modules' graph
    model.blocks[0].ln_1.weight.requires_grad_(False)
    model.train()
    assert cache.decoder(idx, cache) is None  # dropout belongs to the modules
    model.eval()
    with torch.inference_mode():
        assert cache.decoder(idx, cache).shape == (1, 1, 13)
    assert [layer.length for layer in cache.layers] == [1, 1]


def test_fused_step_declines_what_it_would_misread(registry):
    """A cache filled under autocast (bfloat16 storage) or for another batch, and autocast
    itself: op by op, as the modules would; int32 token ids are read as such."""
    model = make_model(registry)
    prompt = torch.tensor([[3, 9, 0]])
    with torch.inference_mode():
        cache = model.new_cache()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.forward_cached(prompt, cache)
            assert cache.decoder(prompt[:, :1], cache) is None  # autocast on
        assert cache.layers[0].k.dtype == torch.bfloat16
        assert cache.decoder(prompt[:, :1], cache) is None  # bfloat16 storage
        cache, plain = model.new_cache(), model.new_cache()
        plain.decoder = None
        model.forward_cached(prompt, cache)
        model.forward_cached(prompt, plain)
        got = cache.decoder(torch.tensor([[4]], dtype=torch.int32), cache)
        want = model.forward_cached(torch.tensor([[4]]), plain)
        assert cache.decoder(torch.tensor([[1], [2]]), cache) is None  # a cache for batch 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert torch.equal(model.generate(prompt.int(), 20, temperature=0),
                       model.generate(prompt, 20, temperature=0, use_cache=False))


def test_decode_step_errors_are_one_line():
    lib = load("cpu")
    ffi, ptr = lib.ffi, lib.ptr
    kv, ws, logits = torch.zeros(1, 3, 4, 8), torch.zeros(4096), torch.zeros(13)
    ids, wte = torch.tensor([2]), torch.ones(13, 24)
    w = [torch.ones(24), None, torch.ones(72, 24), None, torch.ones(24, 24), None,
         torch.ones(24), None, torch.ones(96, 24), None, torch.ones(24, 96), None]
    params = ffi.new("float *[]", [ptr(t) for t in w])
    caches = ffi.new("float *[]", [ptr(kv)])
    spec = ffi.new("gptlab_decode_spec *", {"eps": 1e-5})

    def call(pos, c=24, nh=3, vocab=13):
        return lib.call("gptlab_decode_step_f32", ptr(logits), caches, caches,
                        ptr(ws, "void *"), ptr(ids, "int64_t *"), ptr(wte), ffi.NULL, params,
                        ptr(w[0]), ffi.NULL, ptr(wte), spec, 1, 1, c, nh, vocab, pos, 4, 1)

    assert call(3) == 0 and torch.isfinite(logits).all()
    cos = torch.ones(4)

    def with_cos_only():
        spec.rope_cos = ptr(cos)
        try:
            call(0)
        finally:
            spec.rope_cos = ffi.NULL

    fails = [(lambda: call(0, vocab=2), r"token id 2 outside \[0, 2\)"),
             (with_cos_only, "rotary needs both cos and sin"),
             (lambda: call(4), r"position 4 outside the cache's 4 rows"),
             (lambda: call(0, nh=5), r"nh dividing c \(n_layer=1 b=1 c=24 nh=5 vocab=13\)")]
    for fail, message in fails:
        with pytest.raises(KernelError, match=message) as e:
            fail()
        assert "\n" not in str(e.value)  # one line
    params[2] = ffi.NULL
    with pytest.raises(KernelError, match="a weight pointer is NULL"):
        call(0)
    emu = load("cuda-emu")
    with pytest.raises(KernelError, match="runs on the CPU only"):
        emu.call("gptlab_decode_step_f32", *[emu.ffi.NULL] * 11,
                 emu.ffi.new("gptlab_decode_spec *"), 1, 1, 24, 3, 13, 0, 4, 1)
