"""The fused decoding step (csrc/cpu/decode.c): one C call per block for each decoded token,
checked against the same blocks run module by module, and greedy generation against
generation without the cache."""

import pytest
import torch

from gptlab.core.build import build_model
from gptlab.core.config import ModelConfig
from gptlab.plugins.cuda_kernels import decode
from gptlab.plugins.cuda_kernels.loader import KernelError, load


def make_model(registry, *, bias=True, block_size=16, **parts):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=13, block_size=block_size, n_layer=2, n_head=3, n_embd=24,
                      bias=bias, attention=parts.pop("attention", "flash"),
                      kernels=parts.pop("kernels", "native"), **parts)
    model = build_model(registry, cfg, requires_grad=False).eval()
    with torch.no_grad():  # sharper than the 0.02 init, so greedy decoding is not all ties
        for p in model.parameters():
            p.mul_(8)
    return model


@pytest.mark.parametrize("bias", [True, False])
@torch.inference_mode()
def test_fused_step_matches_the_blocks_one_by_one(registry, bias):
    """Logits and cached keys/values of each step: the fused step's error against a float64
    run of the same weights is within 2x that of the modules' own float32 run."""
    model = make_model(registry, bias=bias)
    ref = make_model(registry, bias=bias, attention="naive", kernels="torch").double()
    ref.load_state_dict(model.state_dict())
    idx = torch.randint(0, 13, (2, 16), generator=torch.Generator().manual_seed(1))
    fused, plain, exact = model.new_cache(), model.new_cache(), ref.new_cache()
    assert isinstance(fused.decoder, decode.FusedDecoder)
    plain.decoder = None
    calls = []
    fused.decoder = spy(fused.decoder, calls)
    def within_2x(got, base, want):
        err, base_err = (got.double() - want).abs().max(), (base.double() - want).abs().max()
        assert err <= 2 * base_err + 1e-6 * want.abs().max(), (err, base_err)

    for t in range(16):  # t = 0: a 1-token prompt, so the step allocates the cache itself
        step = idx[:, t:t + 1]
        within_2x(model.forward_cached(step, fused), model.forward_cached(step, plain),
                  ref.forward_cached(step, exact))
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


def test_greedy_generation_with_the_fused_step_equals_generation_without_cache(registry,
                                                                              monkeypatch):
    model = make_model(registry)
    calls = []
    real = decode.FusedDecoder.__call__
    monkeypatch.setattr(decode.FusedDecoder, "__call__",
                        lambda self, x, cache: calls.append(1) or real(self, x, cache))
    prompt = torch.tensor([[3, 9, 0, 11], [2, 4, 6, 8]])
    # 60 new tokens with block_size 16: the window slides (a new cache) several times
    a = model.generate(prompt, 60, temperature=0, use_cache=False)
    b = model.generate(prompt, 60, temperature=0, use_cache=True)
    assert torch.equal(a, b)
    assert all(len(set(row[4:].tolist())) > 3 for row in a)  # not a trivial sequence
    assert len(calls) > 40  # the steps after each window's first went through the fused step


@pytest.mark.parametrize("parts, reason", [
    (dict(position="rotary"), "position seam"),
    (dict(qk_norm=True), "position seam"),
    (dict(norm="rmsnorm"), "not LayerNorm"),
    (dict(mlp="relu2"), "not the GELU MLP"),
    (dict(block="postnorm"), "not PreNormBlock"),
    (dict(attention="sdpa"), "not the flash backend"),
])
def test_other_parts_decode_op_by_op(registry, parts, reason):
    model = make_model(registry, **parts)
    assert any(reason in r for r in decode.fused_decode_reasons(model))
    assert model.new_cache().decoder is None
    prompt = torch.tensor([[1, 5, 2]])
    assert torch.equal(model.generate(prompt, 20, temperature=0, use_cache=False),
                       model.generate(prompt, 20, temperature=0, use_cache=True))


def test_fused_step_declines_with_gradients_or_in_training(registry):
    model = make_model(registry)
    cache = model.new_cache()
    x = torch.randn(1, 1, 24)
    model.blocks[0].ln_1.weight.requires_grad_(True)
    assert cache.decoder(x, cache) is None  # autograd wants the modules' graph
    model.blocks[0].ln_1.weight.requires_grad_(False)
    model.train()
    assert cache.decoder(x, cache) is None  # dropout belongs to the modules
    model.eval()
    with torch.inference_mode():
        assert cache.decoder(x, cache) is not None
    assert cache.layers[0].length == 1


def test_decode_block_errors_are_one_line():
    lib = load("cpu")
    x, kv, ws = torch.zeros(24), torch.zeros(1, 3, 4, 8), torch.zeros(4096)
    w = [torch.ones(24), None, torch.ones(72, 24), None, torch.ones(24, 24), None,
         torch.ones(24), None, torch.ones(96, 24), None, torch.ones(24, 96), None]
    params = lib.ffi.new("float *[]", [lib.ptr(t) for t in w])

    def call(pos, c=24, nh=3, ptrs=params):
        return lib.call("gptlab_decode_block_f32", lib.ptr(x), lib.ptr(kv), lib.ptr(kv),
                        lib.ptr(ws, "void *"), ptrs, 1, c, nh, pos, 4, 1e-5, 1)

    assert call(3) == 0
    with pytest.raises(KernelError, match=r"position 4 outside the cache's 4 rows"):
        call(4)
    with pytest.raises(KernelError, match=r"nh dividing c \(b=1 c=24 nh=5\)"):
        call(0, nh=5)
    params[2] = lib.ffi.NULL
    with pytest.raises(KernelError, match="a weight pointer is NULL"):
        call(0)
    emu = load("cuda-emu")
    with pytest.raises(KernelError, match="runs on the CPU only"):
        emu.call("gptlab_decode_block_f32", emu.ptr(x), emu.ptr(kv), emu.ptr(kv),
                 emu.ptr(ws, "void *"), emu.ffi.new("float *[]", 12), 1, 24, 3, 0, 4, 1e-5, 1)
