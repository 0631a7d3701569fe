"""Building the kernel libraries: the ABI header, the cache and its lock, compile errors, missing
compilers, `gpt kernels build`, nvcc with zero spills and its ptxas report, the sources in the
package."""

import os
import shutil
import subprocess
import sys
import textwrap

import attrs
import pytest
from click.testing import CliRunner

from gptlab.cli import build_cli
from gptlab.core.attention import AttentionRequest
from gptlab.core.errors import BackendNotSupportedError
from gptlab.plugins.cuda_kernels import backends, build, loader
from gptlab.plugins.cuda_kernels.backends import FlashAttention


def test_abi_version_and_cdef_come_from_the_header():
    lib = loader.load("cpu")
    assert lib.lib.gptlab_abi_version() == loader.ABI_VERSION
    assert lib.flavour == "cpu"
    assert "gptlab_flash_backward_f32" in loader.cdef_source()


def test_no_compiler_is_a_reason_and_auto_moves_on(registry, monkeypatch):
    from gptlab.core.selection import select

    monkeypatch.setenv("CC", "/nonexistent/cc")
    req = AttentionRequest(device="cpu", head_dim=32)
    assert any("compiler for the cpu kernels not found ('/nonexistent/cc'; install gcc or set CC)"
               in r for r in FlashAttention.not_supported_reasons(req))
    assert select(registry, "attention_backends", "auto", req).name == "sdpa"
    with pytest.raises(BackendNotSupportedError, match="compiler for the cpu kernels not found"):
        select(registry, "attention_backends", "flash", req)


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
    assert not list(path.parent.glob("*.tmp")) and build.library_problem(path) is None
    assert lock.read_text() == f"{os.getpid()}\n"  # the last build's pid, for waiters to name


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


@pytest.mark.parametrize("package, folder", [("gptlab.plugins.cuda_kernels", "csrc"),
                                             ("gptlab.verify", "emu")])
def test_every_kernel_source_ships_in_the_package(package, folder):
    """Users compile the kernels (and the emulator) from the installed package: pyproject's
    package-data must cover every file under csrc/ and verify/emu/ (a non-editable wheel had
    none before this was declared)."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")

    root = Path(__file__).resolve().parents[2]
    where = root.joinpath(*package.split("."))
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"][package]
    files = [f.relative_to(where) for f in (where / folder).rglob("*") if f.is_file()]
    assert files and all(any(f.match(p) for p in patterns) for f in files), files


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
    assert {f"flash_tc_{pass_}_kernel<{t}, {d}>" for pass_ in ("forward", "backward")
            for t in ("__nv_bfloat16", "__half") for d in (64, 128)} <= kernels
    plan = build.arch_plan(known=build.nvcc_archs())  # no GPU here: sm_80 and sm_90
    assert {r.arch for r in report} == {f"sm_{a}" for a in plan.sass}
    assert "-lineinfo" in (path.parent / "build.log").read_text().splitlines()[0]
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


def test_without_nvcc_cuda_is_a_reason_not_a_crash(registry, monkeypatch):
    monkeypatch.setenv("NVCC", "/nonexistent/nvcc")
    reasons = backends.FlashAttention.unavailable_reasons("cuda")
    assert reasons == ["compiler for the cuda kernels not found ('/nonexistent/nvcc'; "
                       "install the CUDA toolkit or set NVCC)"]
    res = CliRunner().invoke(build_cli(registry), ["kernels", "build", "--flavour", "cuda"])
    assert res.exit_code == 1  # asked for by name: not building it is an error
    assert res.output == f"Error: cannot build --flavour cuda: {reasons[0]}\n"


# ------------------------------------------------------------------ architectures
NVCC_13_0 = (75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121)  # nvcc --list-gpu-arch


def test_the_cuda_build_targets_the_gpus_that_are_there():
    """SASS for each GPU's own architecture (before: always sm_80 and sm_90, so a newer GPU ran
    compute_90 PTX compiled by the driver at its first launch); where nvcc does not know a GPU,
    SASS of the same major version, else PTX (named in ``jit``); no GPU: sm_80, sm_90."""
    plan = build.arch_plan
    assert plan([], NVCC_13_0) == build.ArchPlan((80, 90))
    assert plan([], NVCC_13_0).flags() == ("-gencode", "arch=compute_80,code=sm_80", "-gencode",
                                           "arch=compute_90,code=[sm_90,compute_90]")
    assert plan([(9, 0)], NVCC_13_0).flags() == ("-gencode",
                                                 "arch=compute_90,code=[sm_90,compute_90]")
    assert plan([(12, 1)], NVCC_13_0) == build.ArchPlan((121,))
    assert plan([(8, 6), (9, 0)], NVCC_13_0) == build.ArchPlan((86, 90))
    assert plan([(12, 1)], (80, 90, 100, 120)) == build.ArchPlan((120,))  # sm_120 runs 12.1
    assert plan([(12, 0)], (80, 86, 90, 100)) == build.ArchPlan(
        (100,), ("GPU 0 (compute capability 12.0)",))  # compute_100 PTX for it
    assert plan([(7, 5)], NVCC_13_0) == build.ArchPlan((80, 90))  # too old: the library says so
    assert plan([(10, 0)], None) == build.ArchPlan((100,))  # nvcc silent: trust the GPU


def test_a_driver_a_minor_version_older_than_nvcc_is_a_reason_where_a_gpu_runs_ptx(monkeypatch):
    """nvcc 13.1 and a 13.0 driver: SASS runs (minor-version compatibility), PTX does not
    (cudaErrorUnsupportedPtxVersion at every launch); before, only major versions were
    compared, so the backend was chosen and failed at its first call."""
    monkeypatch.setattr(build, "nvcc_cuda_version", lambda: (13, 1))
    monkeypatch.setattr(build, "driver_cuda_version", lambda: (13, 0))
    monkeypatch.setattr(build, "nvcc_archs", lambda: (80, 86, 90, 100))
    monkeypatch.setattr(build, "gpu_capabilities", lambda: [(12, 0)])
    why = build.cuda_version_mismatch()
    assert why == ("GPU 0 (compute capability 12.0): nvcc 13.1 has no SASS for it, and its "
                   "compute_100 PTX needs a driver for CUDA 13.1 or newer, but the driver "
                   "supports CUDA 13.0: set NVCC to an nvcc of CUDA <= 13.0 or one that knows "
                   "the GPU, or update the driver")
    monkeypatch.setattr(build, "gpu_capabilities", lambda: [(9, 0)])
    assert build.cuda_version_mismatch() is None  # SASS for it
    monkeypatch.setattr(build, "driver_cuda_version", lambda: (12, 8))
    assert build.cuda_version_mismatch().startswith("the CUDA kernels are built by nvcc 13.1 "
                                                    "(CUDA 13 runtime) but the driver supports "
                                                    "CUDA 12.8")
