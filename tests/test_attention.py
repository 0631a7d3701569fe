"""Attention backends against a float64 reference, and dispatch (auto / named / errors)."""

import math

import pytest
import torch

from gptlab.core.attention import AttentionBackend, AttentionRequest
from gptlab.core.devices import device_unavailable_reason
from gptlab.core.selection import candidates, priority_of, select
from gptlab.core.errors import BackendNotSupportedError, ConfigError, UnknownComponentError


def reference(q, k, v, causal, scale=None):
    q, k, v = q.double(), k.double(), v.double()
    scale = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    s = q @ k.transpose(-2, -1) * scale
    if causal:
        tq, tk = q.size(-2), k.size(-2)
        keep = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("T", [1, 7, 64])
@pytest.mark.parametrize("causal", [True, False])
def test_backend_matches_float64_reference(backend, T, causal):
    torch.manual_seed(T)
    q, k, v = (torch.randn(2, 3, T, 16, requires_grad=True) for _ in range(3))
    out = backend(q, k, v, causal=causal)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, causal)
    assert out.shape == (2, 3, T, 16)
    assert torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a.double(), b, rtol=1e-3, atol=1e-4)


def test_backend_custom_scale_and_decode_alignment(backend):
    torch.manual_seed(0)
    q = torch.randn(1, 2, 3, 8)
    k, v = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    # 3 queries against 10 keys: the causal mask is aligned bottom-right (KV-cache decoding)
    out = backend(q, k, v, causal=True, scale=0.3)
    assert torch.allclose(out.double(), reference(q, k, v, True, scale=0.3), atol=1e-5)
    last = backend(q[:, :, -1:], k, v, causal=True)
    full = backend(q[:, :, -1:], k, v, causal=False)
    assert torch.allclose(last, full, atol=1e-6)  # the last query sees every key


def test_auto_picks_highest_priority_that_fits(registry):
    req = AttentionRequest(device="cpu", head_dim=16)
    fitting = [c for c in registry.attention_backends.values() if not c.not_supported_reasons(req)]
    best = max(fitting, key=lambda c: c.priority)
    assert select(registry, "attention_backends", "auto", req).name == best.name


def test_priorities_depend_on_the_device(registry):
    """flash leads on the CPU; on CUDA its scalar float32 kernel ranks below sdpa, so auto never
    takes it there by priority. A plugin whose priority_for raises keeps its plain priority."""
    def order(device):
        return [c.name for c, _ in candidates(registry, "attention_backends", AttentionRequest(device=device))]

    cpu, cuda = order("cpu"), order("cuda")
    assert cpu.index("flash") < cpu.index("sdpa")
    assert cuda.index("sdpa") < cuda.index("flash")

    class Broken(AttentionBackend):
        name = "broken_priority"
        priority = 7

        @classmethod
        def priority_for(cls, request):
            raise RuntimeError("boom")

    assert priority_of(Broken, AttentionRequest()) == 7


def test_unknown_backend_lists_available(registry):
    with pytest.raises(UnknownComponentError) as e:
        select(registry, "attention_backends", "nosuch", AttentionRequest())
    msg = str(e.value)
    assert "unknown attention backend 'nosuch'" in msg and "naive" in msg and "sdpa" in msg
    assert "\n" not in msg


class OnlyCuda(AttentionBackend):
    name = "only_cuda"
    priority = 1000
    devices = frozenset({"cuda"})
    supports_backward = False

    @classmethod
    def unavailable_reasons(cls, device):
        return ["library not built"]


def test_explicit_unsupported_backend_raises_with_reasons_never_falls_back(registry):
    registry.attention_backends["only_cuda"] = OnlyCuda
    try:
        req = AttentionRequest(device="cpu", dtype=torch.float64, requires_grad=True,
                               dropout_p=0.1)
        with pytest.raises(BackendNotSupportedError) as e:
            select(registry, "attention_backends", "only_cuda", req)
        msg = str(e.value)
        assert "device 'cpu' not supported" in msg
        assert "dtype float64 not supported" in msg
        assert "backward (training) not supported" in msg
        assert "dropout" in msg
        # auto skips it despite its priority
        assert select(registry, "attention_backends", "auto", req).name != "only_cuda"
        # on its own device the environment reasons show: torch's, then the backend's
        cuda_req = AttentionRequest(device="cuda", requires_grad=False)
        torch_reason = [] if torch.cuda.is_available() else [
            device_unavailable_reason("cuda")]
        assert OnlyCuda.not_supported_reasons(cuda_req) == [*torch_reason, "library not built"]
    finally:
        del registry.attention_backends["only_cuda"]


def test_more_queries_than_keys_follows_flash_attention(backend):
    """Causal with tq > tk: the mask is aligned bottom-right, the first tq - tk rows see no key
    and give 0 (never NaN), in values and gradients, for every backend."""
    assert not type(backend).not_supported_reasons(AttentionRequest(q_len=9, k_len=4,
                                                                    head_dim=8))
    torch.manual_seed(0)
    q = torch.randn(1, 2, 9, 8, requires_grad=True)
    k, v = torch.randn(1, 2, 4, 8, requires_grad=True), torch.randn(1, 2, 4, 8)
    out = backend(q, k, v, causal=True)
    assert torch.equal(out[:, :, :5], torch.zeros(1, 2, 5, 8))
    assert torch.allclose(out.double(), reference(q, k, v, True).nan_to_num(0), atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :, :5], torch.zeros(1, 2, 5, 8))
    assert torch.isfinite(k.grad).all()


def test_calling_a_backend_directly_runs_the_dispatch_checks(registry):
    flash_like = registry.attention_backend("sdpa")()
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ConfigError, match=r"attention shapes do not agree: q \(1, 2, 5, 8\), "
                                          r"k \(1, 3, 5, 8\)"):
        flash_like(q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8))
    with pytest.raises(ConfigError, match="4-D"):
        flash_like(q[0], q[0], q[0])
    with pytest.raises(ConfigError, match="different dtypes"):
        flash_like(q, q.double(), q)

    class Float64Only(AttentionBackend):
        name = "f64"
        dtypes = frozenset({torch.float64})

        def forward(self, q, k, v, **kw):
            raise AssertionError("never reached: the checks run first")

    with pytest.raises(BackendNotSupportedError) as e:
        Float64Only()(q, q, q)
    lines = str(e.value).splitlines()
    assert lines[0] == ("attention backend 'f64' cannot run this request; pick another with "
                        "--attention (see `gpt backends`)")
    assert lines[1] == ("  request: device cpu, float32, head_dim 8, q_len 5, k_len 5, causal, "
                        "forward only")
    assert lines[2] == "  f64: dtype float32 not supported (supports: float64)"


def test_auto_with_nothing_fitting_shows_the_request_and_every_backend(registry):
    req = AttentionRequest(device="cpu", dtype=torch.int32, head_dim=8)
    with pytest.raises(BackendNotSupportedError) as e:
        select(registry, "attention_backends", "auto", req)
    lines = str(e.value).splitlines()
    assert lines[0].startswith("no attention backend can run this request;")
    assert lines[1] == ("  request: device cpu, int32, head_dim 8, q_len 128, k_len 128, causal, "
                        "with backward")
    names = [ln.split(":")[0].strip() for ln in lines[2:]]
    assert sorted(names) == sorted(registry.attention_backends)
    assert all("dtype int32 not supported" in ln for ln in lines[2:])


def test_a_backend_whose_reasons_raise_is_listed_not_fatal(registry):
    class Buggy(AttentionBackend):
        name = "buggy"
        priority = 999

        @classmethod
        def not_supported_reasons(cls, request):
            raise ZeroDivisionError("oops")

    registry.attention_backends["buggy"] = Buggy
    try:
        rows = dict((c.name, r) for c, r in candidates(registry, "attention_backends", AttentionRequest()))
        assert rows["buggy"] == ["not_supported_reasons() raised ZeroDivisionError: oops"]
        assert select(registry, "attention_backends", "auto", AttentionRequest(head_dim=16)).name != "buggy"
    finally:
        del registry.attention_backends["buggy"]
