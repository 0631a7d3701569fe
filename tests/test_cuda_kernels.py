"""CUDA kernels: verified on the CPU through the emulator, compile-checked with nvcc, and (on a
machine with a GPU) run for real.

- The conformance suite runs on the emulated ``.cu`` kernels under two schedules.
- A planted bug (the ``__syncthreads`` after staging K/V removed, by a compile flag) must fail it.
- The emulator itself is tested: deadlocks are launch errors, unwritten shared memory reads NaN,
  shuffles are right, a race changes results between schedules, hardware launch limits hold.
- nvcc builds the library for sm_80 and sm_90 with zero register spills (skipped without nvcc).
- Without a GPU, ``cuda`` is reported unavailable with the reason, never a crash.
"""

import shutil
from pathlib import Path

import attrs
import cffi
import pytest
import torch
from click.testing import CliRunner

from gptlab.cli import build_cli
from gptlab.core.build import select_attention
from gptlab.core.errors import BackendNotSupportedError, ConfigError
from gptlab.core.interfaces import AttentionRequest
from gptlab.plugins.cuda_kernels import backends, build, emulator, loader
from gptlab.testing import Case, default_cases, run_conformance

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = ("inorder", "random:1")
HAS_GPU = torch.cuda.is_available()


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("cls", [backends.EmulatedFused, backends.EmulatedFlash],
                         ids=lambda c: c.name)
def test_conformance_on_emulated_cuda_kernels(cls, schedule):
    """Forward and backward of the .cu kernels, every default case (T <= 255), per schedule."""
    cases = default_cases(cls)
    assert len(cases) >= 140 and max(c.tk for c in cases) <= 256
    with emulator.schedule(schedule):
        results = run_conformance(cls(), cases=cases)  # raises, listing every failed case
    assert len(results) == len(cases)


@pytest.mark.parametrize("cls", [backends.EmulatedFused, backends.EmulatedFlash],
                         ids=lambda c: c.name)
def test_emulated_cuda_kernels_at_odd_and_edge_head_dims(cls):
    """Odd head dims (the shared-memory stride is then d itself), and d = 128, whose backward
    uses 43.4 KB of shared memory: under the 48 KB launch limit the emulator enforces."""
    cases = [Case(1, 2, 33, 33, hs, causal) for hs in (1, 7, 33, 127, 128)
             for causal in (True, False)]
    with emulator.schedule("random:3"):
        run_conformance(cls(), cases=cases)


@pytest.fixture
def planted_flash(monkeypatch):
    """flash-emu built with GL_PLANT_MISSING_SYNC: no barrier between staging K/V and using it."""
    flavour = attrs.evolve(build.CUDA_EMU, name="cuda-emu-planted",
                           flags=(*build.CUDA_EMU.flags, "-DGL_PLANT_MISSING_SYNC"))
    monkeypatch.setitem(build.FLAVOURS, flavour.name, flavour)

    class Planted(backends.EmulatedFlash):
        name = "flash-emu-planted"
        kernels = flavour.name

    return Planted()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_planted_missing_syncthreads_fails_the_suite(planted_flash, schedule):
    cases = [Case(1, 1, 7, 7, 8, True), Case(2, 3, 65, 65, 32, True),
             Case(1, 2, 97, 97, 80, False)]
    with emulator.schedule(schedule), pytest.raises(AssertionError, match="3/3 cases failed"):
        run_conformance(planted_flash, cases=cases)


# ------------------------------------------------------------------ the emulator itself
@pytest.fixture(scope="module")
def selftest():
    flavour = build.Flavour(
        name="emu-selftest", compiler_env="CXX", default_compiler="c++",
        sources=(str(ROOT / "tests" / "emu" / "selftest.cu"), "emu/cuda_emu.cpp"),
        headers=("emu/*.h",), flags=build.CUDA_EMU.flags)
    ffi = cffi.FFI()
    ffi.cdef("int selftest(const char *scenario, float *out, int n, char *msg, int msg_len);")
    lib = ffi.dlopen(str(build.build(flavour)))

    def raw(scenario, out=None):  # under whatever $GPTLAB_EMU_SCHEDULE says
        out = torch.zeros(1024) if out is None else out
        msg = ffi.new("char[512]")
        rc = lib.selftest(scenario.encode(), ffi.cast("float *", out.data_ptr()), out.numel(),
                          msg, 512)
        return rc, ffi.string(msg).decode()

    def run(scenario, n=1024, schedule="inorder"):
        out = torch.zeros(n)
        with emulator.schedule(schedule):
            rc, msg = raw(scenario, out)
        return rc, msg, out

    run.__wrapped__ = raw
    return run


def test_emulator_reports_a_barrier_not_all_threads_reach(selftest):
    rc, msg, _ = selftest("partial_barrier")
    assert rc == 719  # cudaErrorLaunchFailure, not a hang
    assert "__syncthreads (selftest.cu:" in msg and "reached by 16 of 32 threads" in msg
    assert "threads 0-15 wait at __syncthreads" in msg and "threads 16-31 exited" in msg
    rc, msg, _ = selftest("divergent_barriers")
    assert rc == 719 and "barrier deadlock" in msg
    assert "threads 0-31 wait at __syncthreads (selftest.cu:" in msg
    rc, msg, _ = selftest("shuffle_after_exit")
    assert rc == 719 and "waits for lane 16 of warp 0, which exited" in msg


def test_emulator_poisons_shared_memory_and_shuffles_right(selftest):
    rc, _, out = selftest("read_unwritten", n=32)
    assert rc == 0 and torch.isnan(out).all()
    rc, _, out = selftest("smem_per_block", n=64)  # block 1 must not see block 0's writes
    assert rc == 0 and torch.equal(out[:32], torch.arange(32.0)) and torch.isnan(out[32:]).all()
    rc, _, out = selftest("shuffles", n=192)
    assert rc == 0
    lane = torch.arange(64) % 32
    out = out.view(64, 3)
    assert torch.equal(out[:, 0], torch.full((64,), 496.0))   # sum of 0..31
    assert torch.equal(out[:, 1], torch.full((64,), 5.0))     # broadcast from lane 5
    assert torch.equal(out[:, 2], torch.where(lane < 31, lane + 1, lane).float())


def test_a_missing_barrier_changes_results_between_schedules(selftest):
    expected = ((torch.arange(128) + 32) % 128 + 1).float().repeat(8)
    results = {s: selftest("race", schedule=s)[2] for s in ("inorder", "random:1", "random:2")}
    assert not torch.equal(results["inorder"], expected)
    assert not torch.equal(results["inorder"], results["random:1"])
    assert not torch.equal(results["random:1"], results["random:2"])
    for s in ("inorder", "random:1"):  # with the barrier: right under every schedule
        rc, _, out = selftest("no_race", schedule=s)
        assert rc == 0 and torch.equal(out, expected)


def test_emulator_enforces_limits_and_schedule_names(selftest, monkeypatch):
    rc, msg, _ = selftest("too_many_threads")
    assert rc == 9 and "invalid launch configuration" in msg
    rc, msg, _ = selftest("too_much_smem")
    assert rc == 9 and "65536 bytes of dynamic shared memory > 49152" in msg
    rc, msg, _ = selftest("smem_overrun")
    assert rc == 719 and "past the 128 bytes the launch asked for" in msg
    rc, msg, _ = selftest("half_warp_sync")
    assert rc == 719 and "the emulator supports only the full-warp mask 0xffffffff" in msg
    assert selftest("nothing")[0] == 0
    with pytest.raises(ConfigError, match="inorder, random or random:SEED"):
        selftest("nothing", schedule="sideways")
    monkeypatch.setenv(emulator.SCHEDULE_ENV, "sideways")  # the emulator checks it too
    lib = selftest.__wrapped__
    rc, msg = lib("nothing")
    assert rc == 1 and "GPTLAB_EMU_SCHEDULE must be inorder, random or random:SEED" in msg


# ------------------------------------------------------------------ nvcc
def test_kernels_build_command_builds_every_flavour_it_has_a_compiler_for(registry):
    res = CliRunner().invoke(build_cli(registry), ["kernels", "build"])
    assert res.exit_code == 0, res.output
    assert "cpu: " in res.output and "flavour cpu" in res.output
    assert "cuda-emu: " in res.output and "flavour cuda-emu" in res.output
    if shutil.which("nvcc"):
        assert "flavour cuda," in res.output and "0 bytes spilled" in res.output
    else:
        assert "cuda: skipped: compiler for the cuda kernels not found" in res.output


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed on this machine")
def test_nvcc_builds_both_cu_files_with_zero_spills():
    path = build.build(build.CUDA)
    report = build.resource_report(path)
    kernels = {r.kernel for r in report}
    assert {"softmax_forward_kernel", "softmax_backward_kernel", "flash_forward_kernel<4>",
            "flash_backward_kernel<4>", "flash_backward_prep_kernel"} <= kernels
    assert {r.arch for r in report} == {"sm_80", "sm_90"}
    spills = [r for r in report if r.spill_stores or r.spill_loads or r.stack_frame]
    assert not spills, spills
    lib = loader.NativeLibrary(path)  # loads without a driver: cudart is static
    assert lib.flavour == "cuda" and lib.lib.gptlab_abi_version() == loader.ABI_VERSION
    count, why = lib.cuda_device_count()  # a count, or the runtime's reason: never a crash
    assert (count > 0 and why is None) or (count == 0 and why)


def test_ptxas_report_is_parsed_per_kernel_and_arch():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN12_GLOBAL__N_120flash_forward_kernelILi4EEEvPfS1_PKfS3_S3_iiifi' for 'sm_80'
ptxas info    : Function properties for _ZN12_GLOBAL__N_120flash_forward_kernelILi4EEEvPfS1_PKfS3_S3_iiifi
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 1024 bytes smem, 412 bytes cmem[0]
ptxas info    : Compiling entry function '_Z1kPfi' for 'sm_90'
ptxas info    : Function properties for _Z1kPfi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers
"""
    a, b = build.parse_ptxas(log)
    assert (a.arch, a.registers, a.stack_frame, a.spill_stores, a.spill_loads, a.static_smem) == (
        "sm_80", 96, 8, 4, 12, 1024)
    assert (b.arch, b.registers, b.spill_stores, b.static_smem) == ("sm_90", 8, 0, 0)
    if shutil.which("c++filt"):
        assert (a.kernel, b.kernel) == ("flash_forward_kernel<4>", "k")


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
    assert len(lines) == 1 and lines[0].startswith("Error: attention backend 'flash' cannot run")
    assert "; ".join(reason) in lines[0] and lines[0].endswith("; use --device cpu")
    res = runner.invoke(build_cli(registry), ["kernels", "check", "--flavour", "cuda"])
    assert res.exit_code == 1 and "Error: fused cannot run on cuda: " + reason[0] in res.output
    with pytest.raises(BackendNotSupportedError):
        select_attention(registry, "flash", AttentionRequest(device="cuda"))
    assert select_attention(registry, "auto", AttentionRequest(device="cpu")).name == "flash"


# ------------------------------------------------------------------ on a GPU
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU here (CI verifies the emulated build)")
@pytest.mark.parametrize("cls", [backends.FusedAttention, backends.FlashAttention],
                         ids=lambda c: c.name)
def test_conformance_on_gpu(cls):
    """The same suite on the nvcc library with CUDA tensors (`gpt kernels check --flavour cuda`)."""
    results = run_conformance(cls(), device="cuda")
    assert len(results) >= 140


def test_emulated_kernels_give_typed_errors():
    from gptlab.plugins.cuda_kernels import ops
    from gptlab.plugins.cuda_kernels.loader import KernelError

    q = torch.randn(1, 1, 4, 130)
    with pytest.raises(KernelError, match=r"gptlab_flash_forward_f32 failed \(code 1\): "
                                          r"flash_forward: head dim 130 > 128"):
        ops.flash_attn(q, q, q, 1.0, True, "cuda-emu")
    with pytest.raises(KernelError, match="float32 required"):
        ops.fused_softmax(torch.randn(2, 3, dtype=torch.float64), 1.0, False, "cuda-emu")
    assert backends.EmulatedFlash.not_supported_reasons(
        AttentionRequest(device="cpu", head_dim=130)) == ["head_dim 130 outside [1, 128]"]
    assert "head_dim 200 > 128 not supported by the CUDA kernels" in " ".join(
        backends.FlashAttention.not_supported_reasons(AttentionRequest(device="cuda",
                                                                       head_dim=200)))


def test_without_nvcc_cuda_is_a_reason_not_a_crash(registry, monkeypatch):
    monkeypatch.setenv("NVCC", "/nonexistent/nvcc")
    reasons = backends.FlashAttention.unavailable_reasons("cuda")
    assert reasons == ["compiler for the cuda kernels not found ('/nonexistent/nvcc'; "
                       "install the CUDA toolkit or set NVCC)"]
    res = CliRunner().invoke(build_cli(registry), ["kernels", "build", "--flavour", "cuda"])
    assert res.exit_code == 0 and "cuda: skipped: compiler for the cuda kernels" in res.output
