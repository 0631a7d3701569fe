"""The Linear layers' matrix products (``--matmul``): ``onednn`` computes what ``F.linear`` does,
forward and backward, eager and compiled; it is chosen by name or by ``auto`` (measured on the
run's Linear shapes, remembered), recorded in the checkpoint and kept on resume; a named one that
cannot run is an error with its reasons. Also: the trainer keeps freed memory for the next step
(:mod:`gptlab.core.malloc`)."""

import os
import subprocess
import sys

import attrs
import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

from gptlab import MatmulRequest
from gptlab.bench.train import Variant
from gptlab.core import autotune, matmuls
from gptlab.core.config import resolve_configs
from gptlab.core.errors import BackendNotSupportedError, ConfigError
from gptlab.core.planning import build_model, choose_components, plan_run, resumed_choices
from gptlab.core.selection import select
from gptlab.nn import Linear
from gptlab.plugins.matmuls import OneDNNMatmul

TEXT = "Natasha laughed and Pierre smiled. " * 40


def _inputs(shape, n_out, bias=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = (0.1 * torch.randn(n_out, shape[-1], generator=g)).requires_grad_()
    b = torch.randn(n_out, generator=g, requires_grad=True) if bias else None
    return x, w, b


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(4, 64, 24), (130, 24), (3, 50, 2, 24)])
def test_onednn_computes_what_f_linear_does_forward_and_backward(shape, bias):
    x, w, b = _inputs(shape, 40, bias)
    with torch.profiler.profile() as prof:
        y = OneDNNMatmul().linear(x, w, b)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], dy)
    calls = [e.name for e in prof.events() if e.name == "mkldnn::_linear_pointwise"]
    assert len(calls) == 2  # the forward and the input gradient went through oneDNN
    y0 = F.linear(x, w, b)
    grads0 = torch.autograd.grad(y0, [t for t in (x, w, b) if t is not None], dy)
    assert y.shape == y0.shape == (*shape[:-1], 40)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    for g, g0 in zip(grads, grads0):
        torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-5)


def test_onednn_takes_strided_inputs_and_inference():
    _, w, b = _inputs((6, 32, 24), 40)
    xt = torch.randn(6, 24, 32).transpose(1, 2)  # (6, 32, 24), not contiguous
    with torch.no_grad():
        torch.testing.assert_close(OneDNNMatmul().linear(xt, w, b), F.linear(xt, w, b),
                                   rtol=1e-5, atol=1e-5)
    # only the weight needs a gradient (the first layer's input does not)
    OneDNNMatmul().linear(xt, w, b).sum().backward()
    w0 = w.detach().clone().requires_grad_()
    F.linear(xt, w0, b.detach()).sum().backward()
    torch.testing.assert_close(w.grad, w0.grad, rtol=1e-5, atol=1e-4)


def test_onednn_leaves_shapes_that_differ_to_torchs_error():
    x, w, b = _inputs((200, 24), 40)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        OneDNNMatmul().linear(x[:, :20], w, b)


def test_onednn_leaves_autocast_other_dtypes_and_a_few_rows_to_torch(monkeypatch):
    x, w, b = _inputs((200, 24), 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = OneDNNMatmul().linear(x, w, b)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, F.linear(x, w, b))
    xd, wd = x.double(), w.double()
    assert torch.equal(OneDNNMatmul().linear(xd, wd, None), F.linear(xd, wd))
    calls = []
    monkeypatch.setattr("gptlab.plugins.matmuls._product",
                        lambda x, w, b: calls.append(x) or F.linear(x, w, b))
    with torch.no_grad():
        assert torch.equal(OneDNNMatmul().linear(x[:127], w, b), F.linear(x[:127], w, b))
        assert not calls  # decoding-sized: torch's
        OneDNNMatmul().linear(x[:128], w, b)
    assert len(calls) == 1


def test_onednn_compiles():
    lin = Linear(24, 40, matmul=OneDNNMatmul())
    x = torch.randn(3, 50, 24)
    y = torch.compile(lin)(x)
    y.sum().backward()
    g = lin.weight.grad.clone()
    lin.weight.grad = None
    F.linear(x, lin.weight, lin.bias).sum().backward()
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, lin.weight.grad, rtol=1e-5, atol=1e-4)


def test_linear_is_nn_linear_with_the_same_state_and_init():
    torch.manual_seed(0)
    a = nn.Linear(24, 40)
    torch.manual_seed(0)
    b = Linear(24, 40, matmul=OneDNNMatmul())
    assert isinstance(b, nn.Linear)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_named_matmuls_that_cannot_run_are_errors(registry):
    assert select(registry, "matmuls", "onednn", MatmulRequest()).name == "onednn"
    with pytest.raises(BackendNotSupportedError) as e:
        select(registry, "matmuls", "onednn", MatmulRequest(dtype=torch.bfloat16))
    assert str(e.value).splitlines() == [
        "matmul 'onednn' cannot run this request; pick another with --matmul (see "
        "`gpt backends`)",
        "  request: device cpu, bfloat16",
        "  onednn: dtype bfloat16 not supported (supports: float32)"]
    # bfloat16 (autocast's products) and other devices: torch's
    assert select(registry, "matmuls", "auto", MatmulRequest(dtype=torch.bfloat16)).name == "torch"
    assert OneDNNMatmul.not_supported_reasons(MatmulRequest(device="cuda"))[0] == (
        "device 'cuda' not supported (supports: cpu)")


def test_every_linear_of_the_model_computes_through_the_chosen_matmul(registry):
    calls = []

    class Counting(OneDNNMatmul):
        def linear(self, x, weight, bias):
            calls.append(tuple(weight.shape))
            return super().linear(x, weight, bias)

    for mlp in ("gelu", "relu2", "swiglu"):
        mc, _ = resolve_configs("tiny", {"attention": "naive", "mlp": mlp}, {})
        mc = attrs.evolve(mc, vocab_size=37)
        parts = attrs.evolve(choose_components(registry, mc), matmul=Counting())
        torch.manual_seed(0)
        model = build_model(registry, mc, components=parts)
        ref = build_model(registry, mc, components=attrs.evolve(parts, matmul=None))
        ref.load_state_dict(model.state_dict())
        calls.clear()
        idx = torch.randint(0, 37, (2, 64), generator=torch.Generator().manual_seed(1))
        logits, loss = model(idx, idx)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert len(calls) == len(linears) == 2 * 4 + 1, mlp  # 2 blocks x 4, and the head
        torch.testing.assert_close(logits, ref(idx, idx)[0], rtol=1e-4, atol=1e-5)


def test_auto_is_measured_on_the_linear_shapes_and_remembered(tmp_path, monkeypatch, registry):
    monkeypatch.setattr(autotune, "cache_path", lambda: tmp_path / autotune.CACHE_FILE)
    monkeypatch.delenv("GPTLAB_AUTO")
    timed = []

    def fake_timer(cls, request, shapes):
        timed.append((cls.name, shapes))
        return lambda: {"onednn": 2.0, "torch": 1.0}[cls.name]  # torch faster here

    monkeypatch.setattr(matmuls, "time_matmul", fake_timer)
    mc, tc = resolve_configs("tiny", {"attention": "naive", "vocab_size": 37}, {"dtype": "float32"})
    assert plan_run(registry, mc, tc).matmul_name == "torch"
    assert {s for _, s in timed} == {matmuls.Shapes(32 * 64, ((96, 288), (96, 96), (96, 384),
                                                              (384, 96)))}
    n = len(timed)
    assert plan_run(registry, mc, tc).matmul_name == "torch" and len(timed) == n  # remembered
    monkeypatch.setenv("GPTLAB_AUTO", "priority")
    assert plan_run(registry, mc, tc).matmul_name == "onednn"  # unmeasured: the priority


def test_real_timing_runs_every_shape_forward_and_backward():
    run = matmuls.time_matmul(OneDNNMatmul, MatmulRequest(), matmuls.Shapes(8, ((4, 12), (12, 4))))
    assert run() > 0


def test_the_run_records_its_matmul_and_a_resumed_run_keeps_it(registry, tmp_path):
    from gptlab.core.checkpoint import load_checkpoint
    from gptlab.core.trainer import Trainer

    mc, tc = resolve_configs("tiny", {"block_size": 8}, {"max_iters": 2, "eval_iters": 1,
                                                         "final_eval_iters": 1,
                                                         "dtype": "float32"})
    Trainer(registry, mc, tc, TEXT, out_dir=tmp_path / "run").fit()
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.metrics["matmul"] == "onednn"  # auto, recorded
    ckpt.metrics["matmul"] = "torch"
    assert Trainer(registry, mc, tc, TEXT, resume=ckpt).plan.matmul_name == "torch"
    del ckpt.metrics["matmul"]  # a checkpoint from before matmuls were chosen: torch's
    assert resumed_choices(ckpt.metrics)["prefer_matmul"] == "torch"
    assert Trainer(registry, mc, tc, TEXT, resume=ckpt).plan.matmul_name == "torch"
    assert resumed_choices(None) == {}


def test_cli_lists_and_takes_matmuls(cli, tmp_path):
    from conftest import error_line, gpt

    r = gpt(cli, "backends")
    assert "matrix products of the Linear layers (--matmul; device cpu, float32):" in r.output
    assert "onednn     priority  20  available: yes  <- auto" in r.output
    assert "--matmul NAME" in gpt(cli, "run", "--help").output
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    r = gpt(cli, "run", "--preset", "tiny", "--data", data, "--iters", "2", "--block-size", "8",
            "--dtype", "float32", "--sample-tokens", "0", "--out-dir", tmp_path / "ok")
    assert r.exit_code == 0, r.output
    assert "attention flash, matmul onednn), vocab" in r.output
    for command in ("sample", "eval"):
        assert "--matmul NAME" in gpt(cli, command, "--help").output
    r = gpt(cli, "eval", tmp_path / "ok", "--matmul", "torch")
    assert r.exit_code == 0 and "loss" in r.output, r.output
    r = gpt(cli, "sample", tmp_path / "ok", "--matmul", "nope", "--tokens", "3")
    assert error_line(r) == "Error: unknown matmul 'nope'; available: auto, onednn, torch"
    r = gpt(cli, "eval", tmp_path / "ok", "--kernels", "nope")  # the user's name, not the
    assert error_line(r) == ("Error: unknown layer kernels 'nope'; available: auto, native, "
                             "torch")  # checkpoint's fault
    r = gpt(cli, "run", "--preset", "tiny", "--data", data, "--iters", "2", "--block-size", "8",
            "--matmul", "nope", "--out-dir", tmp_path / "o")
    assert r.exit_code != 0
    assert error_line(r) == "Error: unknown matmul 'nope'; available: auto, onednn, torch"
    r = gpt(cli, "run", "--preset", "tiny", "--data", data, "--iters", "2", "--block-size", "8",
            "--matmul", "onednn", "--dtype", "bfloat16", "--out-dir", tmp_path / "o")
    assert r.exit_code != 0
    assert error_line(r).startswith("Error: matmul 'onednn' cannot run this request; pick "
                                    "another with --matmul")


def test_bench_variants_name_a_matmul():
    assert Variant.parse("float32:torch").matmul == "torch"
    v = Variant.parse("bfloat16@flash/native:torch~fused-adamw")
    assert (v.attention, v.kernels, v.matmul, v.off) == ("flash", "native", "torch",
                                                          ("fused-adamw",))
    with pytest.raises(ConfigError, match="MATMUL"):
        Variant.parse("peer:torch")


HEAP = """
import ctypes, sys, torch
from gptlab.core import malloc
print(malloc.keep_freed_memory(), file=sys.stderr)
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype = ctypes.c_void_p
start = libc.sbrk(0)
t = torch.empty(12 << 20)  # 48 MiB: above what glibc takes from its heap by itself (32 MiB)
print(libc.sbrk(0) - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_blocks_come_from_the_heap_where_freed_memory_is_kept():
    def heap_growth(setting):
        env = dict(os.environ, GPTLAB_MALLOPT=setting)
        out = subprocess.run([sys.executable, "-c", HEAP], env=env, capture_output=True,
                             text=True, timeout=120, check=True)
        return int(out.stdout), out.stderr.strip().splitlines()[-1]

    grown, applied = heap_growth("1")
    assert applied == "True" and grown > 40 << 20  # the heap: kept for the next step
    grown, applied = heap_growth("0")
    assert applied == "False" and grown < 1 << 20  # its own mmap, unmapped when freed


def test_the_trainer_keeps_freed_memory_on_the_cpu(registry, monkeypatch):
    from gptlab.core import malloc
    from gptlab.core.trainer import Trainer

    calls = []
    monkeypatch.setattr(malloc, "keep_freed_memory", lambda: calls.append(1))
    mc, tc = resolve_configs("tiny", {"block_size": 8}, {"max_iters": 1})
    Trainer(registry, mc, tc, TEXT)
    assert calls == [1]


def test_the_shapes_benchmark_prints_every_product():
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "matmul_shapes.py")
    out = subprocess.run([sys.executable, script, "--n-embd", "8", "--rows", "16", "--rounds",
                          "1"], capture_output=True, text=True, timeout=120, check=True).stdout
    rows = [ln.split() for ln in out.splitlines()[2:]]
    assert [(r[0] + r[1] + r[2], r[3]) for r in rows] == [
        (shape, product) for shape in ("8x24", "8x8", "8x32", "32x8")
        for product in ("forward", "dx", "dw")]
    # GFLOP/s of each implementation and their ratio (tiny products: a slow machine prints 0.0)
    assert all(len(r) == 7 and min(float(x) for x in r[4:]) >= 0 for r in rows)


def test_bench_can_leave_malloc_as_it_is(monkeypatch):
    from gptlab.bench.train import _turn_off
    from gptlab.core import malloc

    monkeypatch.setattr(malloc, "ENABLED", True)
    monkeypatch.setattr(malloc, "_done", None)
    _turn_off(Variant.parse("float32~keep-freed-memory").off)
    assert malloc.keep_freed_memory() is False  # nothing set: the variant's baseline
