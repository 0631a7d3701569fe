"""The public API (``gptlab``, ``gptlab.nn``, ``gptlab.functional``), the position seam, the
one pre-flight per run, and the package's import structure (no cycles; plot without torch)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from torch.nn import functional as F

import gptlab
from conftest import EXAMPLE_PLUGIN
from gptlab.core.errors import BackendNotSupportedError, ConfigError

PACKAGE = Path(gptlab.__file__).resolve().parent


def test_plugin_authors_import_everything_from_gptlab_and_gptlab_nn():
    from gptlab import AttentionBackend, AttentionRequest, Block, LanguageModel, Tokenizer, hookimpl  # noqa: F401
    from gptlab.nn import (  # noqa: F401
        MLP,
        LayerNorm,
        MultiHeadAttention,
        PostNormBlock,
        PreNormBlock,
        causal_mask,
        init_gpt2,
    )

    assert issubclass(PreNormBlock, Block)
    # every base class a hook asks for (gptlab.core.hookspecs), and what they are built from
    assert set(gptlab.__all__) >= {
        "hookimpl", "Tokenizer", "LanguageModel", "Block", "Norm", "FeedForward",
        "PositionScheme", "AttentionBackend", "LayerKernels", "Decoder", "OptimizerRecipe",
        "Components", "AttentionRequest", "KernelRequest", "DecodeRequest", "ModelConfig",
        "TrainConfig", "GptlabError", "load_registry"}
    for name in gptlab.__all__:
        assert getattr(gptlab, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gptlab.nope  # noqa: B018


def _gptlab_imports(path: Path) -> list[tuple[str, list[str]]]:
    """Every ``import gptlab...`` / ``from gptlab... import names`` in a file, anywhere in it
    (inside functions too) but under ``if TYPE_CHECKING:`` (never run), as (module, names)."""
    found = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "gptlab"]
        elif (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
              and node.module.split(".")[0] == "gptlab"):
            found.append((node.module, [a.name for a in node.names]))
    return found


def test_the_example_plugin_and_builtin_plugins_use_only_the_public_api():
    example = EXAMPLE_PLUGIN / "gptlab_example_plugin" / "__init__.py"
    imports = _gptlab_imports(example)
    assert {m for m, _ in imports} == {"gptlab", "gptlab.nn"}
    for module, names in imports:
        assert set(names) <= set(sys.modules[module].__all__), (module, names)
    # gptlab's own model, tokenizer and attention plugins are written the same way
    for sub in ("models", "tokenizers", "attention"):
        for f in (PACKAGE / "plugins" / sub).glob("*.py"):
            outside = [m for m, _ in _gptlab_imports(f) if m.startswith("gptlab.plugins")
                       and not m.startswith(f"gptlab.plugins.{sub}")]
            assert not outside, (f, outside)


def test_core_imports_no_plugin_and_runtime_no_verification_tool():
    """The framework's core reaches plugins only through the registry; the kernel runtime
    (plugins/cuda_kernels) imports the verification tools (gptlab.verify) in its command module
    alone, to offer their commands."""
    for f in (PACKAGE / "core").glob("*.py"):
        plugins = [m for m, _ in _gptlab_imports(f) if m.startswith("gptlab.plugins")]
        assert not plugins, (f, plugins)
    for f in (PACKAGE / "plugins" / "cuda_kernels").glob("*.py"):
        tools = [m for m, _ in _gptlab_imports(f) if m.startswith("gptlab.verify")]
        assert not tools or f.name == "commands.py", (f, tools)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle_in_the_package():
    """Module graph of every ``import`` statement (function-level ones too) among gptlab's
    modules, ``from gptlab import Name`` resolved through the lazy table; must be acyclic."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        deps = set()
        for module, names in _gptlab_imports(path):
            for name in names or [None]:
                if name and f"{module}.{name}" in files:  # from package import submodule
                    deps.add(f"{module}.{name}")
                elif module == "gptlab" and name in gptlab._LAZY:  # from gptlab import Block
                    deps.add(gptlab._LAZY[name])
                else:
                    deps.add(module)
        graph[mod] = deps - {mod}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in graph.get(m, ()):
            if state.get(d) == "open":
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert len(graph) > 30


def test_plot_and_run_folders_import_no_torch():
    code = ("import sys, gptlab, gptlab.plot, gptlab.core.runs, gptlab.core.files, "
            "gptlab.core.paths; print(sorted(m for m in sys.modules if m.split('.')[0] == "
            "'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------- gptlab.functional
def test_functional_attention_is_a_drop_in_for_sdpa():
    from gptlab.functional import _select, attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16, requires_grad=True) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for backend in ("auto", "flash", "fused", "naive", "sdpa"):
        out = attention(q, k, v, is_causal=True, backend=backend)
        assert torch.allclose(out, ref, atol=1e-5), backend
    out = attention(q, k, v, is_causal=False, scale=0.3)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=1e-5)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    # auto is dispatched once per request: training and inference may differ
    before = _select.cache_info()
    with torch.no_grad():
        attention(q, k, v, is_causal=True)
        attention(q, k, v, is_causal=True)
    after = _select.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)
    with pytest.raises(ConfigError, match="takes no attn_mask"):
        attention(q, k, v, attn_mask=torch.ones(17, 17, dtype=torch.bool))
    with pytest.raises(BackendNotSupportedError, match="flash: attention dropout"):
        attention(q, k, v, dropout_p=0.1, backend="flash")


def test_functional_attention_in_a_nanogpt_style_module_under_torch_compile():
    from gptlab.functional import attention

    class CausalSelfAttention(nn.Module):  # nanoGPT's, with one line changed
        def __init__(self, n_embd=32, n_head=4):
            super().__init__()
            self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
            self.n_head = n_head

        def forward(self, x):
            B, T, C = x.size()
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                       for t in (q, k, v))
            y = attention(q, k, v, is_causal=True)  # was F.scaled_dot_product_attention
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    torch.manual_seed(0)
    m = CausalSelfAttention()
    x = torch.randn(2, 9, 32)
    eager = m(x)
    compiled = torch.compile(m, backend="eager")(x)
    assert torch.allclose(eager, compiled, atol=1e-6)
    compiled.sum().backward()


# --------------------------------------------------------------------- the position seam
class ToyRotary(nn.Module):
    """A rotary embedding (Su et al. 2021) written as a plugin would, against the seam only."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, q, k, pos):
        self.seen.append(pos.tolist())
        hs = q.size(-1)
        inv = 1.0 / (10000 ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
        ang = pos[:, None].float() * inv[None, :]  # (T, hs/2)
        cos, sin = ang.cos(), ang.sin()

        def rot(x):
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

        return rot(q), rot(k)


def test_position_seam_rotates_q_and_k_with_and_without_the_kv_cache():
    import types

    import attrs

    from gptlab import PositionScheme, hookimpl
    from gptlab.core.config import ModelConfig
    from gptlab.core.planning import build_model
    from gptlab.core.plugins import load_registry

    seen = []

    class ToyPositions(PositionScheme):  # a plugin's scheme: its module goes in at the seam
        name = "toy"

        @classmethod
        def qk_module(cls, config):
            rotary = ToyRotary()
            rotary.seen = seen
            return rotary

    reg = load_registry([("toy", types.SimpleNamespace(
        register_positions=hookimpl(lambda: ToyPositions)))])
    cfg = ModelConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=16,
                      attention="naive", position="none")
    plain = build_model(reg, cfg, requires_grad=False).eval()
    model = build_model(reg, attrs.evolve(cfg, position="toy"), requires_grad=False).eval()
    with torch.no_grad():
        for p in plain.parameters():
            p.mul_(8)
    model.load_state_dict(plain.state_dict())  # the same weights: the seam adds none
    idx = torch.tensor([[1, 5, 2, 7]])
    assert not torch.allclose(plain(idx)[0], model(idx)[0])  # the seam is in the computation
    assert seen == [[0, 1, 2, 3]] * 2  # one module per layer
    seen.clear()
    with torch.no_grad():
        cache = model.new_cache()
        model.forward_cached(idx[:, :3], cache)
        model.forward_cached(idx[:, 3:], cache)
    assert seen == [[0, 1, 2], [0, 1, 2], [3], [3]]  # positions continue in the cache
    a = model.generate(idx, 40, temperature=0, use_cache=False)  # window jumps included
    b = model.generate(idx, 40, temperature=0, use_cache=True)
    assert torch.equal(a, b)


# --------------------------------------------------------------------- pre-flight
def test_a_run_dispatches_and_prepares_its_backend_once(tmp_path):
    import types

    from gptlab import hookimpl
    from gptlab.cli import build_cli
    from gptlab.core.plugins import load_registry
    from gptlab.plugins.attention.naive import NaiveAttention

    calls = []

    class Counting(NaiveAttention):
        name = "counting"
        priority = 1000  # what auto picks

        @classmethod
        def prepare(cls, request):
            calls.append(request)

    plugin = types.SimpleNamespace(register_attention_backends=hookimpl(lambda: Counting))
    reg = load_registry([("counting", plugin)])
    data = tmp_path / "t.txt"
    data.write_text("Natasha laughed and Pierre smiled. " * 40)
    for attention in ("auto", "counting"):
        calls.clear()
        r = CliRunner().invoke(build_cli(reg), [
            "run", "--preset", "tiny", "--data", str(data), "--iters", "3", "--block-size", "8",
            "--attention", attention, "--sample-tokens", "5", "--out-dir", str(tmp_path / "o"),
            "--overwrite",
            "--eval-interval", "2"], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert "attention counting" in r.output
        assert len(calls) == 1, calls
