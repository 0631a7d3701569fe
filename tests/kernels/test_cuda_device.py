"""CUDA on this machine: without a GPU, `cuda` is explained, never a crash; with one, the
conformance suite runs on the nvcc library."""
import shutil

import pytest
import torch
from click.testing import CliRunner

from gptlab.cli import build_cli
from gptlab.core.attention import AttentionRequest
from gptlab.core.selection import select
from gptlab.core.errors import BackendNotSupportedError
from gptlab.plugins.cuda_kernels import backends, build, loader
from gptlab.testing import run_conformance

HAS_GPU = torch.cuda.is_available()


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: CUDA is available")
def test_cuda_unavailable_is_explained(registry):
    lib_count = None
    if shutil.which("nvcc"):  # with the library built, its runtime's reason is reported too
        lib_count = loader.NativeLibrary(build.build(build.CUDA)).cuda_device_count()[0]
        backends._cuda_reasons.cache_clear()
    runner = CliRunner()
    out = runner.invoke(build_cli(registry), ["backends", "--device", "cuda"])
    assert out.exit_code == 0, out.output
    assert "note: cuda is not available on this machine" in out.output
    flash = out.output.split("flash ")[1].split("\n\n")[0]
    assert "available: no" in flash.splitlines()[0]
    reason = backends.FlashAttention.not_supported_reasons(AttentionRequest(device="cuda"))
    assert reason and all(r in out.output for r in reason)
    if lib_count == 0:
        assert any("find no usable GPU" in r for r in reason)
    res = runner.invoke(build_cli(registry), ["run", "--attention=flash", "--device", "cuda",
                                              "--preset", "tiny"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert lines[0] == "Error: attention backend 'flash' cannot run this request; use --device cpu"
    assert lines[1].startswith("  request: device cuda, float32, head_dim 24,")
    assert lines[2:] == [f"  flash: {'; '.join(reason)}"]
    res = runner.invoke(build_cli(registry), ["kernels", "check", "--flavour", "cuda"])
    assert res.exit_code == 1 and "Error: fused cannot run on cuda: " + reason[0] in res.output
    with pytest.raises(BackendNotSupportedError):
        select(registry, "attention_backends", "flash", AttentionRequest(device="cuda"))
    assert select(registry, "attention_backends", "auto", AttentionRequest(device="cpu")).name == "flash"


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU here (CI verifies the emulated build)")
@pytest.mark.parametrize("cls", [backends.FusedAttention, backends.FlashAttention],
                         ids=lambda c: c.name)
def test_conformance_on_gpu(cls):
    """The same suite on the nvcc library with CUDA tensors (`gpt kernels check --flavour cuda`)."""
    results = run_conformance(cls(), device="cuda")
    assert len(results) >= 140
