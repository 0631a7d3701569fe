"""`gpt kernels gpucheck`: its arithmetic (FLOPs, occupancy, launch bounds), timing harness,
soft-failing sections and report on the CPU; the whole command end to end on the emulated
kernels (with a stand-in compute-sanitizer that runs the small-case script for real); the one-line
error without a GPU; the CUDA version mismatch; and, where a GPU is, the real command."""

import os
import stat

import pytest
import torch
from click.testing import CliRunner

from gptlab.cli import build_cli
from gptlab.core.attention import AttentionRequest
from gptlab.nn import TorchKernels
from gptlab.plugins.cuda_kernels import backends, build
from gptlab.testing import check_layer_kernels, default_cases
from gptlab.verify import emulated
from gptlab.verify.gpucheck import conformance, sanitizer
from gptlab.verify.gpucheck.benchmark import attention_flops, measure_attention
from gptlab.verify.gpucheck.occupancy import (KNOWN_LIMITS, launch_bounds, limits_for, occupancy,
                                              parse_launch_bounds)
from gptlab.verify.gpucheck.options import QUICK_HEAD_DIMS, QUICK_SEQ_LENS, SECTIONS, Options
from gptlab.verify.gpucheck.report import Report, Section, run_section, slug
from gptlab.verify.gpucheck.smoke import smoke
from gptlab.verify.gpucheck.targets import Target, cuda_target, emulated_target
from gptlab.verify.gpucheck.timing import median_time

HAS_GPU = torch.cuda.is_available()


# ------------------------------------------------------------------ the plain functions
def test_attention_flops_count_as_flashattention_2_does():
    fwd = 4 * 8 * 12 * 2048 * 2048 * 64
    assert attention_flops(8, 12, 2048, 2048, 64, causal=False) == fwd
    assert attention_flops(8, 12, 2048, 2048, 64, causal=True) == fwd / 2
    assert attention_flops(8, 12, 2048, 2048, 64, causal=True, backward=True) \
        == fwd / 2 * 3.5
    assert attention_flops(1, 1, 3, 5, 2, causal=False) == 4 * 3 * 5 * 2


@pytest.mark.parametrize("regs, threads, smem, cc, expected", [
    # 229 registers: 29 x 256 per warp, 2 warps per register-file quarter -> 8 warps, 2 blocks
    (229, 128, 0, (9, 0), (2, 8, 0.125, "registers")),
    (32, 128, 0, (9, 0), (16, 64, 1.0, "threads")),
    # 48 KiB of shared memory (+1 KiB reserved): 4 blocks in 228 KiB
    (32, 128, 48 * 1024, (9, 0), (4, 16, 0.25, "shared memory")),
    # sm_86: 16 blocks at most, 48 warps
    (32, 64, 0, (8, 6), (16, 32, 32 / 48, "blocks")),
    (168, 256, 0, (8, 0), (1, 8, 0.125, "registers")),
])
def test_occupancy_follows_the_calculators_arithmetic(regs, threads, smem, cc, expected):
    occ = occupancy(regs, threads, smem, limits_for(*cc))
    assert (occ.blocks_per_sm, occ.warps_per_sm, occ.fraction, occ.limiter) == expected
    assert str(occ).startswith(f"{expected[2]:.0%} ({expected[0]} blocks")


def test_limits_take_torchs_device_properties_over_the_table():
    class Props:
        regs_per_multiprocessor = 32768
        max_threads_per_multi_processor = 1024
        shared_memory_per_multiprocessor = 65536

    lim = limits_for(9, 0, Props())
    assert (lim.arch, lim.regs_per_sm, lim.max_threads_per_sm, lim.smem_per_sm,
            lim.max_blocks_per_sm) == ("sm_90", 32768, 1024, 65536, 32)
    assert limits_for(12, 0).arch == "sm_120"  # unknown: defaults, named


def test_launch_bounds_are_read_from_ptx():
    ptx = """
.version 9.0
.target sm_90
	// .globl	_Z6kernelPf
.visible .entry _Z6kernelPf(
	.param .u64 _Z6kernelPf_param_0
)
.maxntid 256, 1, 1
{
	ret;
}
.entry _ZN12_GLOBAL__N_120flash_forward_kernelILi4EEEvPfS1_(
	.param .u64 p0,
	.param .align 8 .b8 p1[16]
)
.maxntid 32, 4, 1
.minnctapersm 1
{
	ret;
}
.visible .entry _Z7nolimitv(
)
{
	ret;
}
"""
    assert parse_launch_bounds(ptx) == {
        "_Z6kernelPf": 256, "_ZN12_GLOBAL__N_120flash_forward_kernelILi4EEEvPfS1_": 128}


def test_environment_shows_occupancy_from_cuobjdumps_ptx(registry, tmp_path, monkeypatch):
    """A stand-in cuobjdump gives every kernel of the build log `.maxntid 128`: the ptxas table
    gets threads and occupancy (sm_90 limits in the emulated run)."""
    mangled = ["_Z6kernelPf"]
    if build.find_compiler(build.CUDA):
        log = (build.build(build.CUDA).parent / "build.log").read_text()
        mangled = sorted({name for name, _arch in build._ENTRY.findall(log)})
    ptx = "".join(f".visible .entry {m}(\n\t.param .u64 p\n)\n.maxntid 128, 1, 1\n{{\n}}\n"
                  for m in mangled)
    (tmp_path / "ptx.txt").write_text(ptx)
    tool = tmp_path / "cuobjdump"
    tool.write_text(f"#!/bin/sh\ncat {tmp_path / 'ptx.txt'}\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    bounds, why = launch_bounds(tmp_path / "lib.so")
    assert why is None and set(bounds.values()) == {128} and len(bounds) == len(mangled)
    if not build.find_compiler(build.CUDA):
        return
    out = tmp_path / "r.md"
    res = CliRunner().invoke(build_cli(registry), ["kernels", "gpucheck", "--emulate", "--out",
                                                   str(out), "--sections", "environment"])
    assert res.exit_code == 0, res.output
    md = out.read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| `flash_backward_kernel<4>`"))
    regs = int(row.split("|")[3])
    expected = occupancy(regs, 128, 0, KNOWN_LIMITS[(9, 0)])
    assert row.endswith(f"| 128 | {expected} |") and "registers" in str(expected)
    assert "threads per block unknown" not in md


def test_median_time_warms_up_then_takes_the_median_of_the_timer():
    calls, scripted = [], iter([0.5, 0.1, 0.3, 0.9, 0.2])

    def step():
        calls.append("step")

    def timer(fn):
        fn()
        return next(scripted)

    timing = median_time(step, timer=timer, reps=5, warmup=3)
    assert timing.median_s == 0.3 and timing.samples == (0.5, 0.1, 0.3, 0.9, 0.2)
    assert len(calls) == 3 + 5
    with pytest.raises(ValueError, match="reps must be >= 1"):
        median_time(step, timer=timer, reps=0)


def test_measure_attention_reports_times_flops_and_ratios(registry):
    ticks = iter(range(1, 100))
    m = measure_attention(registry.attention_backend("sdpa")(), B=1, H=2, T=16, D=8,
                          causal=True, dtype=torch.float32, device="cpu", reps=3, warmup=1,
                          timer=lambda fn: (fn(), next(ticks) * 1e-3)[1],
                          peak=lambda fn: (fn(), 2.0)[1])
    assert m.fwd.samples == (0.001, 0.002, 0.003) and m.fwd_bwd.median_s == 0.005
    assert m.fwd_flops == 4 * 2 * 16 * 16 * 8 / 2 and m.fwd_bwd_flops == 3.5 * m.fwd_flops
    cells = m.cells(m)
    assert cells[0] == "2.00" and cells[2] == "1.00" and cells[6] == "2.0" and cells[7] == "1.00"


def test_a_section_that_raises_is_one_line_and_the_next_runs():
    seen = []

    def broken(section):
        section.add("started")
        raise RuntimeError("the GPU fell off the bus\nsecond line")

    a = run_section("broken", broken, seen.append)
    b = run_section("fine", lambda s: s.add("- pass all"), seen.append)
    assert a.failed and a.lines == ["started",
                                    "**error** (RuntimeError): the GPU fell off the bus"]
    assert not b.failed and b.lines == ["- pass all"]
    assert [m.split(":")[1].split()[0] for m in seen] == ["starting", "FAILED", "starting", "ok"]
    report = Report("gpucheck: test", header=["head"], sections=[a, b])
    md = report.markdown()
    assert report.failed == ["broken"]
    assert "| broken | FAIL |" in md and "| fine | pass |" in md
    assert md.index("## broken") < md.index("## fine") and md.endswith("- pass all\n")


def test_slug_names_the_report_after_the_gpu():
    assert slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert slug("  ") == "gpu"


def test_targets_find_the_packages_cuda_kernels_in_the_registry(registry):
    cuda, emu = cuda_target(registry), emulated_target(registry)
    assert {"flash", "fused"} <= {c.name for c in cuda.attention}
    assert "sdpa" not in {c.name for c in cuda.attention} and cuda.baseline.name == "sdpa"
    assert {c.name for c in cuda.layer_kernels} == {"native"}
    assert {"flash-emu", "fused-emu"} <= {c.name for c in emu.attention}
    assert [c.name for c in emu.layer_kernels] == ["native-emu"] and emu.device == "cpu"


@pytest.mark.filterwarnings("ignore:var\\(\\)")
def test_layer_kernel_conformance_catches_wrong_kernels():
    class TanhGelu(TorchKernels):
        name = "tanh-gelu"

        def linear_gelu(self, x, linear):
            return torch.nn.functional.gelu(linear(x), approximate="tanh")

    class UnbiasedVariance(TorchKernels):
        name = "unbiased"

        def layer_norm(self, x, weight, bias, eps):
            return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + eps) \
                * weight + bias

    assert all(r.ok for r in check_layer_kernels(TorchKernels()))
    bad = {r.op for r in check_layer_kernels(TanhGelu()) if not r.ok}
    assert bad == {"linear_gelu"}
    bad = {r.op for r in check_layer_kernels(UnbiasedVariance()) if not r.ok}
    assert bad == {"layer_norm"}


# ------------------------------------------------------------------ the command
def fake_sanitizer(folder, body: str):
    """A `compute-sanitizer` on PATH: `--tool NAME --error-exitcode N CMD...`, then ``body``."""
    path = folder / "compute-sanitizer"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU (test_gpucheck_on_gpu runs)")
def test_without_a_gpu_gpucheck_is_a_one_line_error(registry, tmp_path):
    res = CliRunner().invoke(build_cli(registry), ["kernels", "gpucheck", "--out",
                                                   str(tmp_path / "r.md")])
    assert res.exit_code == 1 and not (tmp_path / "r.md").exists()
    assert res.output.startswith("Error: no CUDA GPU visible to torch: torch ")
    assert "--emulate" in res.output and len(res.output.strip().splitlines()) == 1


def test_emulated_gpucheck_runs_every_section_end_to_end(registry, tmp_path, monkeypatch):
    """The whole command on the CPU: the .cu kernels by the emulator, conformance (--quick),
    the precision rule, the layer kernels, the small-case script run for real under a stand-in
    memcheck, and the benchmark table (~30 s on 2 cores)."""
    monkeypatch.setenv("PATH", fake_sanitizer(tmp_path, (
        'if [ "$2" = memcheck ]; then shift 4; "$@" || exit 97; fi\n'
        'echo "========= ERROR SUMMARY: 0 errors"\n')))
    out = tmp_path / "report.md"
    res = CliRunner().invoke(build_cli(registry), ["kernels", "gpucheck", "--emulate", "--out",
                                                   str(out), "--rule-seq-len", "128", "--quick"])
    assert res.exit_code == 0, res.output
    md = out.read_text()
    assert md.startswith("# gpucheck: emulated CUDA kernels on the CPU\n")
    for section in SECTIONS:
        assert f"| {section} | pass |" in md and f"## {section}" in md
    assert f"[{len(SECTIONS)}/{len(SECTIONS)}] benchmark: ok" in res.output
    assert f"report: {out}" in res.output
    quick = len(default_cases(emulated.EmulatedFlash, seq_lens=QUICK_SEQ_LENS,
                              head_dims=QUICK_HEAD_DIMS))
    assert f"- pass `flash-emu` float32: {quick} cases" in md
    assert f"- pass `fused-emu` float32: {quick} cases" in md
    assert "precision rule, causal T=128 D=64: flash-emu" in md
    assert "- pass layer kernels `native-emu` float32: 10 cases" in md
    for tool in sanitizer.TOOLS:
        assert f"- pass {tool}: ERROR SUMMARY: 0 errors" in md
    if build.find_compiler(build.CUDA):
        assert "| `flash_backward_kernel<4>` | sm_90 |" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| `") and "| float32 | 32 |" in ln]
    assert len(rows) == 6 and all("unsupported" not in r for r in rows)  # 3 backends x causal
    assert "| cuda build for | SASS sm_80, sm_90, PTX compute_90 |" in md
    calls = ["`flash-emu` float32 D=64", "`flash-emu` bfloat16 D=64",  # tensor cores
             "`flash-emu` float16 D=64", "`fused-emu` float32 D=64",
             "layer kernels `native-emu` float32"]
    for label in calls:
        assert f"- pass {label}\n" in md  # layouts
        assert f"- pass {label}: captured, no sync" in md  # graphs
        assert f"- pass {label}: ran on GPU 1, no context on GPU 0, results as on GPU 0" in md
    assert "- skip (emulated): CPU tensors have no streams" in md
    assert "- pass GPTLAB_CUDA_SYNC=1: the op raised: gptlab_layernorm_forward_f32 failed" in md
    assert "- pass without GPTLAB_CUDA_SYNC: the op returned; the next call raised" in md


def test_sanitizer_errors_fail_the_run_with_their_summary(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_sanitizer(tmp_path, (
        'echo "========= Invalid __global__ write of size 4 bytes"\n'
        'echo "=========     at flash_forward_kernel+0x1f0"\n'
        'echo "========= ERROR SUMMARY: 2 errors"\nexit 97\n')))
    out = tmp_path / "report.md"
    res = CliRunner().invoke(build_cli(registry), ["kernels", "gpucheck", "--emulate", "--out",
                                                   str(out), "--sections", "sanitizer"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == (
        f"Error: 1 of 1 sections failed (sanitizer); see {out}")
    md = out.read_text()
    assert "- FAIL memcheck (exit 97): ERROR SUMMARY: 2 errors" in md
    assert "    - `Invalid __global__ write of size 4 bytes`" in md
    assert md.count("- FAIL ") == 3


def test_a_failing_section_does_not_stop_the_next(registry, tmp_path, monkeypatch):
    def broken():
        raise OSError("nvcc vanished")

    monkeypatch.setattr(build, "nvcc_cuda_version", broken)
    monkeypatch.setenv("PATH", os.pathsep.join(  # and no compute-sanitizer
        d for d in os.environ["PATH"].split(os.pathsep)
        if not os.path.exists(os.path.join(d, "compute-sanitizer"))))
    out = tmp_path / "report.md"
    res = CliRunner().invoke(build_cli(registry), [
        "kernels", "gpucheck", "--emulate", "--out", str(out),
        "--sections", "environment,sanitizer,benchmark", "--seq-len", "16"])
    assert res.exit_code == 1 and "(environment)" in res.output
    md = out.read_text()
    assert "**error** (OSError): nvcc vanished" in md
    assert "| sanitizer | pass |" in md and "compute-sanitizer is missing" in md
    assert "| benchmark | pass |" in md and "| `flash-emu` | float32 | 32 | yes |" in md


def test_a_backend_that_raises_is_one_fail_line_and_the_others_still_run():
    """Conformance on a borrowed GPU: an error from one backend (a launch failure, say) is its
    FAIL line; the backends and layer kernels after it are still checked."""
    from gptlab.plugins.attention.naive import NaiveAttention

    class Naive(NaiveAttention):
        dtypes = frozenset({torch.float32})

    class Crashing(Naive):
        name = "crashing"

        def forward(self, q, k, v, **kw):
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    class Torch32(TorchKernels):
        dtypes = frozenset({torch.float32})

    class GpuOnly(Torch32):
        name = "gpu-only"
        devices = frozenset({"cuda"})

    target = Target(device="cpu", emulated=False, attention=(Crashing, Naive),
                    layer_kernels=(GpuOnly, Torch32), baseline=Naive)
    s = Section("conformance")
    conformance.run(s, target, Options.emulated(rule_T=64, quick=True), lambda _: None)
    text = "\n".join(s.lines)
    assert s.failed
    assert "- FAIL `crashing` float32: (RuntimeError) CUDA error: an illegal memory access " \
           "was encountered" in text
    assert "- pass `naive` float32:" in text
    assert "- FAIL precision rule, causal T=64 D=64: `crashing` float32: (RuntimeError)" in text
    assert "- skip layer kernels `gpu-only` float32: device 'cpu' not supported (supports: " \
           "cuda)" in text
    assert "- pass layer kernels `torch` float32:" in text


def test_unknown_section_is_a_usage_error(registry):
    res = CliRunner().invoke(build_cli(registry), ["kernels", "gpucheck", "--emulate",
                                                   "--sections", "environment,speed"])
    assert res.exit_code == 2 and "unknown section(s) speed" in res.output


def test_smoke_script_runs_every_emulated_kernel(registry):
    lines = smoke(emulated_target(registry))
    assert "flash-emu float32 D=128 causal=False" in lines
    assert "fused-emu float32 D=32 causal=True" in lines
    assert "flash-emu bfloat16 D=128 causal=True" in lines  # flash.cu's tensor-core twin
    assert "native-emu float32: layer_norm, linear_gelu, cross_entropy" in lines
    # flash-emu and fused-emu: float32, D = 32, 64, 128; flash-emu also in bfloat16 and
    # float16, D = 64 and 128 only (flash-tc-emu, an alias, not again); causal or not; then
    # the layer kernels
    assert len(lines) == 2 * 3 * 2 + 2 * 2 * 2 + 1


def test_layouts_gives_awkward_views_and_catches_an_op_that_ignores_them():
    """The layouts section's inputs really are at storage offset 1 with odd row strides; a
    backend that reads its inputs as if contiguous from the storage's start fails it."""
    from gptlab.plugins.attention.naive import NaiveAttention
    from gptlab.verify.gpucheck import layouts

    x = torch.arange(24.0).view(2, 3, 4)
    v = layouts.awkward(x)
    assert torch.equal(v, x) and v.storage_offset() == 1 and v.stride() == (15, 5, 1)

    class Naive(NaiveAttention):
        dtypes = frozenset({torch.float32})

    class Careless(Naive):
        name = "careless"

        def forward(self, q, k, v, **kw):
            flat = [torch.as_strided(t, t.shape, torch.empty(t.shape).stride(), 0)
                    for t in (q, k, v)]
            return super().forward(*flat, **kw)

    target = Target(device="cpu", emulated=False, attention=(Careless, Naive),
                    layer_kernels=(TorchKernels,), baseline=Naive)
    s = Section("layouts")
    layouts.run(s, target, Options.emulated(), lambda _: None)
    text = "\n".join(s.lines)
    assert s.failed and "- FAIL `careless` float32 D=64: output 0 (1, 2, 33, 64) differs" in text
    assert "- pass `naive` float32 D=64" in text and "- pass layer kernels `torch` float32" in text


def test_a_probe_process_is_read_line_by_line(tmp_path, monkeypatch):
    from gptlab.verify.gpucheck.probe import run_probe

    (tmp_path / "fake_probe.py").write_text(
        "print('noise')\nprint('pass one')\nprint('skip two: why')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    s = Section("graphs")
    run_probe(s, "fake_probe")
    assert s.lines[-2:] == ["- pass one", "- skip two: why"] and not s.failed
    (tmp_path / "fake_probe.py").write_text("print('pass one')\nraise SystemExit(3)\n")
    s = Section("graphs")
    run_probe(s, "fake_probe")
    assert s.failed and "- FAIL: exit 3" in s.lines


# ------------------------------------------------------------------ CUDA versions
def test_nvcc_version_is_parsed():
    text = ("nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, "
            "V13.0.88\nBuild cuda_13.0.r13.0/compiler.36424714_0\n")
    assert build.parse_nvcc_version(text) == (13, 0)
    assert build.parse_nvcc_version("no version here") is None


def test_cuda_version_mismatch_is_named_in_one_line(monkeypatch):
    monkeypatch.setattr(build, "nvcc_cuda_version", lambda: (13, 0))
    monkeypatch.setattr(build, "driver_cuda_version", lambda: (12, 4))
    why = build.cuda_version_mismatch()
    assert why.startswith("the CUDA kernels are built by nvcc 13.0 (CUDA 13 runtime) but the "
                          "driver supports CUDA 12.4")
    assert why.endswith("set NVCC to a CUDA 12.x nvcc, or update the driver to >= 580.65.06")
    assert "\n" not in why
    monkeypatch.setattr(build, "driver_cuda_version", lambda: (13, 1))
    assert build.cuda_version_mismatch() is None  # same major: minor-version compatibility
    monkeypatch.setattr(build, "driver_cuda_version", lambda: None)
    assert build.cuda_version_mismatch() is None  # no driver: the other reasons say so


def test_driver_version_without_a_driver_is_none_not_a_crash():
    version = build.driver_cuda_version()
    assert version is None or (isinstance(version, tuple) and version[0] >= 10)


def test_backends_name_the_mismatch(registry, tmp_path, monkeypatch):
    """A stand-in nvcc 13.0 and a driver for CUDA 12.4: `gpt backends --device cuda` and the
    CUDA backends' reasons name both versions (no GPU, no build needed)."""
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("NVCC", str(nvcc))
    monkeypatch.setattr(build, "driver_cuda_version", lambda: (12, 4))
    backends._cuda_reasons.cache_clear()
    try:
        reasons = backends.FlashAttention.not_supported_reasons(AttentionRequest(device="cuda"))
        mismatch = [r for r in reasons if "built by nvcc 13.0" in r]
        assert len(mismatch) == 1 and "driver supports CUDA 12.4" in mismatch[0]
        res = CliRunner().invoke(build_cli(registry), ["backends", "--device", "cuda"])
        assert res.exit_code == 0 and f"    - {mismatch[0]}" in res.output
    finally:
        backends._cuda_reasons.cache_clear()


# ------------------------------------------------------------------ on a GPU
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU here (the emulated run is "
                                        "test_emulated_gpucheck_runs_every_section_end_to_end)")
def test_gpucheck_on_gpu(registry, tmp_path):
    out = tmp_path / "gpu.md"
    res = CliRunner().invoke(build_cli(registry), [
        "kernels", "gpucheck", "--out", str(out), "--sections",
        "environment,conformance,layouts,streams,graphs,devices,faults,benchmark",
        "--seq-len", "256", "--reps", "3", "--rule-seq-len", "512"])
    md = out.read_text()
    assert res.exit_code == 0, md
    assert f"# gpucheck: {torch.cuda.get_device_name()}" in md
    assert "- pass `flash` float32" in md and "- pass `fused` float32" in md
    for section in ("layouts", "streams", "graphs", "devices", "faults"):
        assert f"| {section} | pass |" in md
    assert "- pass `flash` float32 D=64: first launch inside the capture" in md
    assert "| `flash` | float32 | 64 | yes |" in md and "TFLOP/s" in md
