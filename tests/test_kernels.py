"""Native kernels: conformance of every backend, memory behaviour, build cache, lock, errors."""

import math
import os
import subprocess
import sys
import textwrap

import attrs
import pytest
import torch

from gptlab.core.errors import BackendNotSupportedError
from gptlab.core.interfaces import AttentionRequest
from gptlab.plugins.cuda_kernels import build, loader, ops
from gptlab.plugins.cuda_kernels.backends import FlashAttention, FusedAttention
from gptlab.plugins.cuda_kernels.loader import KernelError
from gptlab.testing import OUT_TOL, Case, check_case, run_conformance


def test_conformance_suite(backend):
    """Every registered CPU backend: outputs and q/k/v grads vs float64 on odd shapes."""
    results = run_conformance(backend)
    assert len(results) >= 140
    worst = max(r.out_error for r in results)
    assert worst < OUT_TOL


def test_conformance_catches_a_wrong_backend(registry):
    class OffByScale(FlashAttention):
        name = "broken"

        def forward(self, q, k, v, *, causal=True, dropout_p=0.0, scale=None):
            return super().forward(q, k, v, causal=causal, scale=1.01 / math.sqrt(q.size(-1)))

    class LeakyMask(FlashAttention):
        name = "leaky"

        def forward(self, q, k, v, *, causal=True, dropout_p=0.0, scale=None):
            return super().forward(q, k, v, causal=False)

    with pytest.raises(AssertionError, match="cases failed"):
        run_conformance(OffByScale(), cases=[Case(1, 2, 65, 65, 16, True)])
    with pytest.raises(AssertionError, match="causal=True"):
        run_conformance(LeakyMask(), cases=[Case(1, 2, 7, 7, 8, True)])
    assert check_case(LeakyMask(), Case(1, 2, 7, 7, 8, False)).ok


def test_flash_backward_saves_no_t_by_t_tensor():
    T, D = 256, 16
    q, k, v = (torch.randn(2, 2, T, D, requires_grad=True) for _ in range(3))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = FlashAttention()(q, k, v, causal=True)
    out.sum().backward()
    assert saved and max(saved) <= 2 * 2 * T * D < T * T
    # the fused backend, by contrast, keeps the (T, T) probabilities
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        FusedAttention()(q, k, v, causal=True)
    assert max(saved) >= T * T


def test_fully_masked_rows_are_zero_not_nan():
    lib = loader.load("cpu")
    # 3 queries, 2 keys, causal bottom-right: query 0 sees no key
    q, k, v = torch.randn(1, 3, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    o, lse = torch.empty(1, 3, 8), torch.empty(1, 3)
    lib.call("gptlab_flash_forward_f32", lib.ptr(o), lib.ptr(lse), lib.ptr(q), lib.ptr(k),
             lib.ptr(v), 1, 3, 2, 8, 0.35, 1, lib.ffi.NULL, 1)
    assert torch.isfinite(o).all() and o[0, 0].abs().max() == 0 and lse[0, 0] == math.inf
    x = torch.full((1, 2, 4), -math.inf)
    y = ops.fused_softmax(x, 1.0, False)
    assert torch.equal(y, torch.zeros_like(y))


def test_fused_softmax_matches_torch_and_gradcheck_like():
    x = torch.randn(3, 33, 70, requires_grad=True)
    y = ops.fused_softmax(x, 0.7, True)
    keep = torch.ones(33, 70, dtype=torch.bool).tril(70 - 33)
    x64 = x.detach().double().requires_grad_()
    ref = torch.softmax((x64 * 0.7).masked_fill(~keep, -math.inf), -1)
    assert torch.allclose(y.double(), ref, atol=1e-6)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (rx,) = torch.autograd.grad(ref, x64, g.double())
    assert torch.allclose(gx.double(), rx, atol=1e-5)


def test_bad_inputs_are_typed_errors():
    with pytest.raises(KernelError, match="float32 required"):
        ops.flash_attn(*(torch.randn(1, 1, 4, 8, dtype=torch.float64) for _ in range(3)), 1.0,
                       True)
    lib = loader.load("cpu")
    with pytest.raises(KernelError, match=r"gptlab_flash_forward_f32 failed \(code 1\).*sizes"):
        lib.call("gptlab_flash_forward_f32", *([lib.ffi.cast("float *", 8)] * 5), 1, 0, 4, 8,
                 1.0, 1, lib.ffi.NULL, 1)
    with pytest.raises(KernelError, match="head dim 300 > 256"):
        ops.flash_attn(*(torch.randn(1, 1, 4, 300) for _ in range(3)), 1.0, True)
    with pytest.raises(KernelError, match="dropout"):
        FlashAttention()(*(torch.randn(1, 1, 4, 8) for _ in range(3)), dropout_p=0.1)


def test_abi_version_and_cdef_come_from_the_header():
    lib = loader.load("cpu")
    assert lib.lib.gptlab_abi_version() == loader.ABI_VERSION
    assert lib.flavour == "cpu"
    assert "gptlab_flash_backward_f32" in loader.cdef_source()


def test_no_compiler_is_a_reason_and_auto_moves_on(registry, monkeypatch):
    from gptlab.core.build import select_attention

    monkeypatch.setenv("CC", "/nonexistent/cc")
    req = AttentionRequest(device="cpu", head_dim=32)
    assert any("compiler for the cpu kernels not found ('/nonexistent/cc'; install gcc or set CC)"
               in r for r in FlashAttention.not_supported_reasons(req))
    assert select_attention(registry, "auto", req).name == "sdpa"
    with pytest.raises(BackendNotSupportedError, match="compiler for the cpu kernels not found"):
        select_attention(registry, "flash", req)


def test_build_is_cached_keyed_and_a_dead_lock_holder_does_not_block(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_KERNEL_CACHE", str(tmp_path))
    key = build.build_key(build.CPU)
    lock = build.library_path(build.CPU, key).parent.with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    # a process takes the build lock and is SIGKILLed while holding it
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, time
        fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    path = build.build(build.CPU)
    assert path.is_file() and path.parent.name == f"cpu-{key}"
    assert loader.NativeLibrary(path).lib.gptlab_abi_version() == loader.ABI_VERSION
    mtime = path.stat().st_mtime_ns
    assert build.build(build.CPU) == path and path.stat().st_mtime_ns == mtime  # cached
    assert not list(path.parent.glob("*.tmp"))


def test_concurrent_builds_agree(tmp_path):
    env = {**os.environ, "GPTLAB_KERNEL_CACHE": str(tmp_path)}
    code = ("from gptlab.plugins.cuda_kernels import build, loader; p = build.build('cpu'); "
            "loader.NativeLibrary(p); print(p)")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert len({o[0].strip() for o in outs}) == 1


def test_compile_error_is_one_line_with_log(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_KERNEL_CACHE", str(tmp_path))
    bad = attrs.evolve(build.CPU, flags=(*build.CPU.flags, "-include", "no_such_header.h"))
    with pytest.raises(build.KernelBuildError, match="building the cpu kernels failed.*build.log"):
        build.build(bad)


def test_flash_trains_like_naive(registry):
    """Same seed, same data: flash and naive give the same losses (they compute the same)."""
    from gptlab.core.config import ModelConfig, TrainConfig
    from gptlab.core.training import train

    text = "It was in July, 1805, and the speaker was the well-known Anna Pavlovna. " * 30
    losses = {}
    for name in ("naive", "flash", "fused"):
        mc = ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, attention=name)
        tc = TrainConfig(max_iters=40, batch_size=8, eval_interval=20, eval_iters=4,
                         final_eval_iters=4, seed=3)
        losses[name] = train(registry, mc, tc, text).val_loss
    assert abs(losses["flash"] - losses["naive"]) < 1e-3
    assert abs(losses["fused"] - losses["naive"]) < 1e-3


def test_flash_works_under_torch_compile():
    flash = FlashAttention()
    f = torch.compile(lambda q, k, v: flash(q, k, v).sum(), backend="eager", fullgraph=True)
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    f(q, k, v).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_every_kernel_source_ships_in_the_package():
    """Users compile the kernels from the installed package: pyproject's package-data must cover
    every file under csrc/ (a non-editable wheel had none before this was declared)."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")

    root = Path(__file__).resolve().parents[1]
    package = root / "gptlab" / "plugins" / "cuda_kernels"
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["gptlab.plugins.cuda_kernels"]
    files = [f.relative_to(package) for f in (package / "csrc").rglob("*") if f.is_file()]
    assert files and all(any(f.match(p) for p in patterns) for f in files), files


def test_flash_lse_is_an_auxiliary_output_without_gradient():
    """The backward has no d(lse) term, so lse must not pretend to be differentiable."""
    q = torch.randn(1, 2, 8, 8, requires_grad=True)
    o, lse = ops.flash_attn(q, q, q, 0.3, True)
    assert o.requires_grad and not lse.requires_grad
