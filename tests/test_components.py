"""The swappable transformer parts of the speedrun era, each against its formula or a float64
reference: rotary position embeddings (Su et al. 2021), RMSNorm (Zhang & Sennrich 2019),
QK-norm, ReLU² (So et al. 2021), SwiGLU (Shazeer 2020), untied head and zero-init, the Muon
optimiser (Jordan et al. 2024); generation with the KV cache equal to generation without it for
every position scheme; the CLI."""

import math

import pytest
import torch
from torch.nn import functional as F

from gptlab.core.planning import build_model
from gptlab.core.checkpoint import load_model
from gptlab.core.config import ModelConfig, TrainConfig
from gptlab.core.optimizers import Muon, MuonRecipe, muon_params, newton_schulz
from gptlab.nn import MLP, QKNorm, ReLU2MLP, RMSNorm, Rotary, SwiGLUMLP
from gptlab.nn.mlps import swiglu_hidden
from test_cli import SMALL, invoke


def test_rotary_matches_the_complex_rotation_and_preserves_norms():
    hs, T = 8, 11
    rot = Rotary(hs, max_len=32).double()
    rot.cos, rot.sin = rot.cos.double(), rot.sin.double()
    q, k = torch.randn(2, 3, T, hs, dtype=torch.float64), torch.randn(2, 3, T, hs,
                                                                       dtype=torch.float64)
    pos = torch.arange(5, 5 + T)
    rq, rk = rot(q, k, pos)
    # reference: pair i is the complex number q[i] + j q[i + hs/2], times e^(j pos theta_i)
    theta = 10000.0 ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    z = torch.complex(q[..., :hs // 2], q[..., hs // 2:]) * torch.polar(
        torch.ones(T, hs // 2, dtype=torch.float64), pos[:, None].double() * theta)
    assert torch.allclose(rq, torch.cat((z.real, z.imag), dim=-1), atol=1e-6)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-6)
    assert torch.allclose(rk.norm(dim=-1), k.norm(dim=-1), atol=1e-6)


def test_rotary_makes_q_dot_k_depend_only_on_the_offset():
    hs = 16
    rot = Rotary(hs, max_len=64)
    q, k = torch.randn(1, 1, 1, hs), torch.randn(1, 1, 1, hs)

    def score(m, n):
        rq, _ = rot(q, q, torch.tensor([m]))
        _, rk = rot(k, k, torch.tensor([n]))
        return float((rq * rk).sum())

    for m, n in [(7, 3), (20, 9), (40, 40)]:
        for shift in (1, 5, 17):
            assert math.isclose(score(m, n), score(m + shift, n + shift), abs_tol=1e-5)
    assert not math.isclose(score(7, 3), score(7, 4), abs_tol=1e-3)


def test_rmsnorm_and_qknorm_match_the_formula():
    x = torch.randn(4, 5, 24, dtype=torch.float64)
    norm = RMSNorm(24, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24))
    want = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert torch.allclose(norm(x), want, atol=1e-12)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]  # no bias
    q, k = torch.randn(2, 3, 7, 8) * 5, torch.randn(2, 3, 7, 8) * 0.1
    nq, nk = QKNorm()(q, k, None)
    for t in (nq, nk):
        assert torch.allclose(t.pow(2).mean(-1), torch.ones(2, 3, 7), atol=1e-3)  # eps 1e-6


def small_config(**kw):
    return ModelConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=24, **kw)


def test_relu2_and_swiglu_follow_their_formulas_with_comparable_parameters():
    cfg = small_config()
    x = torch.randn(2, 5, 24)
    relu2 = ReLU2MLP(cfg)
    want = relu2.c_proj(F.relu(relu2.c_fc(x)) ** 2)
    assert torch.allclose(relu2.eval()(x), want)
    sw = SwiGLUMLP(cfg)
    h = swiglu_hidden(24)
    w1, w3 = sw.c_fc.weight[:h], sw.c_fc.weight[h:]
    b1, b3 = sw.c_fc.bias[:h], sw.c_fc.bias[h:]
    gate, up = x @ w1.T + b1, x @ w3.T + b3
    want = sw.c_proj(gate * torch.sigmoid(gate) * up)
    assert torch.allclose(sw.eval()(x), want, atol=1e-6)
    gelu = sum(p.numel() for p in MLP(ModelConfig(n_embd=192, n_head=6)).parameters())
    glu = sum(p.numel() for p in SwiGLUMLP(ModelConfig(n_embd=192, n_head=6)).parameters())
    assert swiglu_hidden(192) == 512 and abs(glu - gelu) / gelu < 0.01


def test_the_parts_are_built_where_named(registry):
    model = build_model(registry, small_config(norm="rmsnorm", mlp="swiglu", position="rotary",
                                               qk_norm=True, untied_head=True, zero_init=True,
                                               attention="naive"))
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"RMSNorm", "SwiGLUMLP", "Rotary", "QKNorm"} <= kinds
    assert not {"LayerNorm", "MLP"} & kinds
    assert model.wpe is None  # rotary: no position table
    assert model.lm_head.weight is not model.wte.weight
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight") or name == "lm_head.weight":
            assert p.abs().max() == 0, name  # zero-init
    plain = build_model(registry, small_config(attention="naive"))
    assert plain.lm_head.weight is plain.wte.weight and plain.wpe is not None
    assert not any(type(m).__name__ in ("Rotary", "QKNorm") for m in plain.modules())


@pytest.mark.parametrize("position", ["learned", "rotary", "none"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_cached_generation_equals_uncached_for_every_position_scheme(registry, position,
                                                                     qk_norm):
    torch.manual_seed(0)
    model = build_model(registry, small_config(position=position, qk_norm=qk_norm,
                                               attention="naive"), requires_grad=False).eval()
    with torch.no_grad():  # sharper than the init, so greedy decoding is not all ties
        for p in model.parameters():
            p.mul_(8)
    prompt = torch.randint(0, 13, (2, 5), generator=torch.Generator().manual_seed(1))
    a = model.generate(prompt, 40, temperature=0, use_cache=False)  # past block_size 16:
    b = model.generate(prompt, 40, temperature=0, use_cache=True)   # the window jumps
    assert torch.equal(a, b)


def test_cli_trains_and_samples_with_the_parts(cli, registry, tmp_path):
    text = tmp_path / "small.txt"
    text.write_text(SMALL)
    out = tmp_path / "run"
    args = ["run", "--preset", "tiny", "--data", str(text), "--iters", "6", "--block-size", "16",
            "--eval-interval", "3", "--attention", "naive", "--sample-tokens", "0",
            "--out-dir", str(out), "--norm", "rmsnorm", "--mlp", "relu2", "--position",
            "rotary", "--qk-norm", "--untied-head", "--zero-init"]
    result = invoke(cli, args)
    assert result.exit_code == 0, result.output
    model, _, _ = load_model(registry, out)
    cfg = model.config
    assert (cfg.norm, cfg.mlp, cfg.position, cfg.qk_norm, cfg.untied_head, cfg.zero_init) == \
        ("rmsnorm", "relu2", "rotary", True, True, True)
    result = invoke(cli, ["sample", str(out), "--tokens", "20", "--seed", "1"])
    assert result.exit_code == 0 and len(result.output) >= 20


def test_transformer_parts_named_for_the_bigram_are_an_error_before_anything_is_written(
        cli, registry, tmp_path):
    text = tmp_path / "small.txt"
    text.write_text(SMALL)
    out = tmp_path / "run"
    result = invoke(cli, ["run", "--preset", "bigram", "--data", str(text), "--out-dir",
                          str(out), "--position", "rotary", "--qk-norm", "--attention", "flash"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1] == (
        "Error: the bigram model has no attention or blocks, so --attention flash, --position "
        "rotary, --qk-norm would do nothing; drop them or use --model transformer")
    assert not out.exists()
    # a model built from a saved config (a checkpoint from before this check) is not refused
    cfg = ModelConfig(model="bigram", vocab_size=5, block_size=4, attention="flash")
    assert build_model(registry, cfg).config.attention == "flash"


# ------------------------------------------------------------------------ Muon
@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (64, 64)])
def test_newton_schulz_is_close_to_orthogonal_with_the_same_singular_vectors(shape):
    # a gradient-like matrix with singular values spread over [0.05, 1] (five quintic steps
    # lift anything above ~1e-3 of the Frobenius norm into the band; a random square matrix
    # has singular values far below that)
    gen = torch.Generator().manual_seed(0)
    n = min(shape)
    q1, _ = torch.linalg.qr(torch.randn(shape[0], n, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(shape[1], n, generator=gen, dtype=torch.float64))
    sv = torch.logspace(math.log10(0.05), 0, n, dtype=torch.float64)
    g = q1 @ torch.diag(sv) @ q2.T
    o = newton_schulz(g).double()
    U, _, Vh = torch.linalg.svd(g, full_matrices=False)
    inner = U.T @ o @ Vh.T  # diagonal if o = U diag(s') V^T
    s = torch.linalg.svdvals(o)
    assert 0.6 < s.min() and s.max() < 1.25  # the quintic's band around 1 (Jordan et al.)
    off = inner - torch.diag(inner.diagonal())
    assert off.norm() < 1e-3 * inner.norm()
    assert (o - U @ Vh).norm() < 0.3 * (U @ Vh).norm()


def test_muon_orthogonalises_same_shape_matrices_as_one_stack_each_on_its_own():
    gen = torch.Generator().manual_seed(1)
    gs = [torch.randn(24, 40, generator=gen) * s for s in (1.0, 1e-3, 30.0)]  # norms apart
    stacked = newton_schulz(torch.stack(gs))
    for g, o in zip(gs, stacked):
        assert torch.allclose(o, newton_schulz(g), atol=1e-5)
    ps = [torch.nn.Parameter(g.clone()) for g in gs] + [torch.nn.Parameter(torch.randn(40, 24))]
    opt = Muon(ps, lr=0.1, momentum=0.9)
    for p in ps:
        p.grad = p.detach().clone()
    want = [p.detach() - 0.1 * max(1, p.size(0) / p.size(1)) ** 0.5
            * newton_schulz(1.9 * p.detach()) for p in ps]  # buf = g; g + 0.9 buf
    opt.step()
    for p, w in zip(ps, want):
        assert torch.allclose(p.detach(), w, atol=1e-5)


def test_muon_step_follows_its_formula_and_the_split_of_parameters(registry):
    p = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.float64))
    opt = Muon([p], lr=0.1, momentum=0.9)
    start, buf = p.detach().clone(), torch.zeros(8, 4, dtype=torch.float64)
    for step in range(2):
        g = torch.randn(8, 4, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + g
        start = start - 0.1 * (8 / 4) ** 0.5 * newton_schulz(g + 0.9 * buf).double()
        assert torch.allclose(p.detach(), start, atol=1e-6), step
    model = build_model(registry, small_config(untied_head=True, attention="naive"))
    hidden, rest = muon_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in hidden} == {n for n, p in model.named_parameters()
                                              if p.dim() == 2 and not n.startswith(("wte", "wpe",
                                                                                    "lm_head"))}
    assert {"wte.weight", "wpe.weight", "lm_head.weight"} <= {names[id(p)] for p in rest}
    opt = MuonRecipe.build(model, TrainConfig(optimizer="muon", muon_lr=0.03))
    assert [g["base_lr"] for g in opt.param_groups if "base_lr" in g] == [0.03]


def test_a_plugin_adds_its_own_norm_mlp_position_and_optimizer():
    import types

    import torch.nn as nn

    from gptlab import hookimpl
    from gptlab.core.interfaces import FeedForward, Norm, PositionScheme
    from gptlab.core.optimizers import OptimizerRecipe
    from gptlab.core.plugins import load_registry

    class ScaleNorm(Norm):  # Nguyen & Salazar 2019: g * x / ||x||
        name = "scalenorm"

        def __init__(self, ndim, bias=True, eps=1e-5):
            super().__init__(ndim, bias, eps)
            self.g = nn.Parameter(torch.tensor(float(ndim) ** 0.5))

        def forward(self, x):
            return self.g * x / x.norm(dim=-1, keepdim=True).clamp_min(1e-5)

    class Narrow(FeedForward):
        name = "narrow"

        def __init__(self, config):
            super().__init__(config)
            self.c_proj = nn.Linear(config.n_embd, config.n_embd)

        def forward(self, x):
            return self.c_proj(torch.tanh(x))

    class Halved(PositionScheme):
        name = "halved"
        learned_table = True

    class Sgd(OptimizerRecipe):
        name = "sgd"

        @classmethod
        def build(cls, model, cfg):
            return torch.optim.SGD(model.parameters(), lr=cfg.learning_rate)

    mod = types.SimpleNamespace(
        register_norms=hookimpl(lambda: ScaleNorm), register_mlps=hookimpl(lambda: [Narrow]),
        register_positions=hookimpl(lambda: Halved), register_optimizers=hookimpl(lambda: Sgd))
    reg = load_registry([("mine", mod)])
    assert not reg.problems
    model = build_model(reg, small_config(norm="scalenorm", mlp="narrow", position="halved",
                                          attention="naive"))
    kinds = [type(m).__name__ for m in model.modules()]
    assert kinds.count("ScaleNorm") == 2 * 2 + 1 and kinds.count("Narrow") == 2
    assert reg.optimizers["sgd"] is Sgd
    info = next(p for p in reg.plugins if p.name == "mine")
    assert info.registered == {"norm": ["scalenorm"], "MLP": ["narrow"],
                               "position scheme": ["halved"], "optimizer": ["sgd"]}
