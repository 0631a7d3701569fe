"""Every model part against a hand computation or a float64 reference."""

import math

import pytest
import torch

from gptlab.core.planning import build_model
from gptlab.core.config import ModelConfig
from gptlab.core.errors import ConfigError
from gptlab.nn import MLP, LayerNorm, MultiHeadAttention, SingleHeadAttention
from gptlab.plugins.attention.naive import NaiveAttention

CFG = ModelConfig(vocab_size=11, block_size=16, n_layer=2, n_head=4, n_embd=32)


def test_layernorm_matches_formula_in_float64():
    torch.manual_seed(0)
    ln = LayerNorm(7).double()
    with torch.no_grad():
        ln.weight.copy_(torch.randn(7))
        ln.bias.copy_(torch.randn(7))
    x = torch.randn(3, 5, 7, dtype=torch.float64) * 4 + 2
    y = ln(x)
    for b in range(3):
        for t in range(5):
            row = x[b, t].tolist()
            mean = sum(row) / 7
            var = sum((r - mean) ** 2 for r in row) / 7
            expect = [(r - mean) / math.sqrt(var + 1e-5) * w + bb
                      for r, w, bb in zip(row, ln.weight.tolist(), ln.bias.tolist())]
            assert y[b, t].tolist() == pytest.approx(expect, rel=1e-12, abs=1e-12)


def test_layernorm_normalises_and_has_gradients():
    ln = LayerNorm(16, bias=False).double()
    x = (torch.randn(4, 16, dtype=torch.float64) * 10 + 3).requires_grad_()
    y = ln(x)
    assert torch.allclose(y.mean(-1), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(4, dtype=torch.float64),
                          atol=1e-4)
    small = x[:2, :5].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(LayerNorm(5).double(), (small,))


def test_mlp_is_linear_gelu_linear():
    torch.manual_seed(0)
    mlp = MLP(CFG).double().eval()
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    h = x @ mlp.c_fc.weight.T + mlp.c_fc.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    expect = h @ mlp.c_proj.weight.T + mlp.c_proj.bias
    assert torch.allclose(mlp(x), expect, atol=1e-12)


def reference_attention(q, k, v):
    """Float64, loop-based causal attention for one head: (T, hs) tensors."""
    T, hs = q.shape
    out = torch.zeros_like(v)
    for t in range(T):
        scores = [float(q[t] @ k[j]) / math.sqrt(hs) for j in range(t + 1)]
        m = max(scores)
        w = [math.exp(s - m) for s in scores]
        z = sum(w)
        out[t] = sum(wj / z * v[j] for j, wj in enumerate(w))
    return out


def test_single_head_attention_matches_loop_reference():
    torch.manual_seed(0)
    head = SingleHeadAttention(8, 4, NaiveAttention()).double()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = head.query(x[0]), head.key(x[0]), head.value(x[0])
    assert torch.allclose(head(x)[0], reference_attention(q, k, v), atol=1e-12)


def test_multi_head_equals_concatenated_single_heads_then_projection():
    torch.manual_seed(0)
    mha = MultiHeadAttention(CFG, NaiveAttention()).double().eval()
    C, nh = CFG.n_embd, CFG.n_head
    hs = C // nh
    x = torch.randn(2, 9, C, dtype=torch.float64)
    heads = []
    Wq, Wk, Wv = mha.c_attn.weight.split(C, dim=0)
    bq, bk, bv = mha.c_attn.bias.split(C)
    for h in range(nh):
        s = slice(h * hs, (h + 1) * hs)
        head = SingleHeadAttention(C, hs, NaiveAttention(), bias=True).double()
        with torch.no_grad():
            for lin, W, b in ((head.query, Wq, bq), (head.key, Wk, bk), (head.value, Wv, bv)):
                lin.weight.copy_(W[s])
                lin.bias.copy_(b[s])
        heads.append(head(x))
    concat = torch.cat(heads, dim=-1)  # (B, T, C)
    expect = mha.c_proj(concat)
    assert torch.allclose(mha(x), expect, atol=1e-12)


@pytest.mark.parametrize("block", ["prenorm", "postnorm"])
def test_causal_mask_leaks_no_future_token(registry, backend_name, block):
    cfg = ModelConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16,
                      block=block, attention=backend_name)
    torch.manual_seed(0)
    model = build_model(registry, cfg).eval()
    idx = torch.randint(0, 11, (2, 16))
    logits, _ = model(idx)
    for t in range(15):
        changed = idx.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1 + t % 10) % 11  # every later token differs
        logits2, _ = model(changed)
        assert torch.equal(logits2[:, : t + 1], logits[:, : t + 1]), f"leak into position {t}"
        assert not torch.allclose(logits2[:, t + 1:], logits[:, t + 1:])


def test_gpt2_init_scales_residual_projections(registry):
    cfg = ModelConfig(vocab_size=11, block_size=16, n_layer=8, n_head=4, n_embd=256)
    torch.manual_seed(0)
    model = build_model(registry, cfg)
    proj = torch.cat([b.attn.c_proj.weight.flatten() for b in model.blocks]
                     + [b.mlp.c_proj.weight.flatten() for b in model.blocks])
    fc = torch.cat([b.mlp.c_fc.weight.flatten() for b in model.blocks])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.03)
    assert fc.std().item() == pytest.approx(0.02, rel=0.03)
    assert model.blocks[0].mlp.c_fc.bias.abs().max().item() == 0
    assert model.lm_head.weight is model.wte.weight


def test_transformer_forward_shapes_loss_and_initial_loss(registry):
    torch.manual_seed(0)
    model = build_model(registry, CFG)
    idx, targets = torch.randint(0, 11, (2, 3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 11)
    # at init the prediction is near uniform: loss close to ln(vocab)
    assert loss.item() == pytest.approx(math.log(11), abs=0.1)
    assert model(idx)[1] is None
    with pytest.raises(ConfigError, match="exceeds block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_bigram_logits_are_table_rows(registry):
    cfg = ModelConfig(model="bigram", vocab_size=5, block_size=4)
    model = build_model(registry, cfg)
    idx = torch.tensor([[0, 3, 3, 1]])
    logits, _ = model(idx)
    assert torch.equal(logits[0], model.token_embedding_table.weight[idx[0]])


def test_generate_greedy_top_k_and_validation(registry):
    torch.manual_seed(0)
    model = build_model(registry, CFG).eval()
    idx = torch.zeros(1, 1, dtype=torch.long)
    out = model.generate(idx, 20, temperature=0)
    assert out.shape == (1, 21)
    assert torch.equal(out, model.generate(idx, 20, temperature=0))
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    assert torch.equal(model.generate(idx, 20, top_k=3, generator=g1),
                       model.generate(idx, 20, top_k=3, generator=g2))
    # top_k=1 is greedy whatever the temperature
    assert torch.equal(model.generate(idx, 20, temperature=2.0, top_k=1), out)
    with pytest.raises(ConfigError, match="temperature"):
        model.generate(idx, 1, temperature=-1)
    with pytest.raises(ConfigError, match="top_k"):
        model.generate(idx, 1, top_k=0)


# ------------------------------------------------------------------------ the leave-out parts
# What the ladder's first rungs leave out, each a registered part of its own (`gpt plugins`):
# norm `none`, MLP `none`, the block without residual connections (`plain`), one head
# (`single-head`).
def _parts(registry, **names):
    from gptlab.core.interfaces import Components

    cfg = ModelConfig(vocab_size=11, block_size=16, n_layer=1,
                      **{"n_head": 2, "n_embd": 8, **{k: v for k, v in names.items()
                                                      if k in ("n_head", "n_embd")}})
    return cfg, Components(block=registry.block(names.get("block", "prenorm")),
                           attention=NaiveAttention(),
                           norm_class=registry.get("norms", names.get("norm", "layernorm")),
                           mlp_class=registry.get("mlps", names.get("mlp", "gelu")),
                           position=registry.get("positions", "learned"))


def test_norm_none_is_the_identity_forward_and_backward(registry):
    norm = registry.get("norms", "none")(8, bias=True)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    y = norm(x)
    assert torch.equal(y, x) and list(norm.parameters()) == []
    w = torch.randn(2, 3, 8, dtype=torch.float64)
    (y * w).sum().backward()
    assert torch.equal(x.grad, w)  # dy/dx = I


def test_mlp_none_adds_nothing_to_a_residual_block_forward_and_backward(registry):
    torch.manual_seed(0)
    cfg, parts = _parts(registry, mlp="none")
    block = parts.block(cfg, parts).double()
    assert list(block.mlp.parameters()) == []
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    y = block(x)
    assert torch.equal(block.mlp(x), torch.zeros_like(x))
    expect = x + block.attn(block.ln_1(x))  # the block is its attention sub-layer alone
    assert torch.allclose(y, expect, atol=1e-12)
    w = torch.randn_like(x)
    gx, *gp = torch.autograd.grad((y * w).sum(), [x, *block.attn.parameters()])
    ex, *ep = torch.autograd.grad((expect * w).sum(), [x, *block.attn.parameters()])
    assert torch.allclose(gx, ex, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(gp, ep))


@pytest.mark.parametrize("mlp", ["gelu", "none"])
def test_plain_block_has_no_residual_connections(registry, mlp):
    torch.manual_seed(0)
    cfg, parts = _parts(registry, block="plain", mlp=mlp)
    block = parts.block(cfg, parts).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    h = block.attn(block.ln_1(x))  # each sub-layer's output replaces its input
    expect = h if mlp == "none" else block.mlp(block.ln_2(h))
    assert torch.allclose(block(x), expect, atol=1e-12)
    assert torch.autograd.gradcheck(block, (x[:1, :3].clone().requires_grad_(),))


def test_single_head_block_is_one_head_of_the_models_width(registry):
    torch.manual_seed(0)
    cfg, parts = _parts(registry, block="single-head", norm="none", mlp="none", n_head=1)
    block = parts.block(cfg, parts).double()
    assert not hasattr(block.attn, "c_proj")  # no output projection
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    head = block.attn
    with torch.no_grad():
        q, k, v = head.query(x[0]), head.key(x[0]), head.value(x[0])  # (T, C) each: hs = C
    assert torch.allclose(block(x)[0], reference_attention(q, k, v), atol=1e-12)
    assert torch.autograd.gradcheck(block, (x[:, :4].clone().requires_grad_(),))
    with pytest.raises(ConfigError, match="block single-head has one attention head; use "
                                          "--n-head 1, not 2"):
        cfg2, parts2 = _parts(registry, block="single-head")
        parts2.block(cfg2, parts2)


@pytest.mark.parametrize("block, n_head", [("plain", 2), ("single-head", 1)])
def test_the_leave_out_blocks_leak_no_future_token(registry, block, n_head):
    cfg = ModelConfig(vocab_size=11, block_size=16, n_layer=2, n_head=n_head, n_embd=16,
                      block=block, norm="none", mlp="none", attention="naive")
    torch.manual_seed(0)
    model = build_model(registry, cfg).eval()
    idx = torch.randint(0, 11, (2, 16))
    logits, _ = model(idx)
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 3) % 11
    logits2, _ = model(changed)
    assert torch.equal(logits2[:, :8], logits[:, :8])
    assert not torch.equal(logits2[:, 8:], logits[:, 8:])  # (tiny: no norm, GPT-2's init)
