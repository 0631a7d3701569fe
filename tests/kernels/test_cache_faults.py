"""Faults in the kernel cache: a damaged or foreign library, a cache that cannot be used, a held
lock, a killed build's temporary files, a flavour asked for by name that cannot be built.

Each ends in one typed line naming the problem and the fix (or in a rebuild), never a SIGBUS or a
traceback; ``auto`` moves on to sdpa. Where a library must be compiled, the ``cpu`` flavour is
replaced by a stub exporting the ABI's functions (built in well under a second), built once per
module and copied into each test's cache; nothing here touches the user's cache.
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import _cffi_backend
import attrs
import pytest
from click.testing import CliRunner

from gptlab.cli import build_cli
from gptlab.core.attention import AttentionRequest
from gptlab.core.selection import select
from gptlab.core.errors import GptlabError
from gptlab.plugins.cuda_kernels import build, loader
from gptlab.plugins.cuda_kernels.abi import ABI_VERSION, cdef_source
from gptlab.plugins.cuda_kernels.loader import KernelError, NativeLibrary

REQUEST = AttentionRequest(device="cpu", head_dim=32)
FUNCTIONS = sorted(set(re.findall(r"\b(gptlab_\w+)\(", cdef_source())))


def stub_source(omit: str = "") -> str:
    """C for a library with every function of the ABI (as no-ops), less ``omit``."""
    special = {"gptlab_abi_version": f"int gptlab_abi_version(void) {{ return {ABI_VERSION}; }}",
               "gptlab_flavour": 'const char *gptlab_flavour(void) { return "cpu"; }',
               "gptlab_last_error": 'const char *gptlab_last_error(void) { return ""; }'}
    return "\n".join(special.get(f, f"int {f}(void) {{ return 0; }}")
                     for f in FUNCTIONS if f != omit) + "\n"


def stub_flavour(src) -> build.Flavour:
    return attrs.evolve(build.CPU, sources=(str(src),), headers=(), native_cpu=False,
                        flags=("-O0", "-fPIC", "-shared"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """(the stub flavour, its built library folder): compiled once for the module."""
    root = tmp_path_factory.mktemp("pristine")
    (root / "stub.c").write_text(stub_source())
    flavour = stub_flavour(root / "stub.c")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTLAB_KERNEL_CACHE", str(root / "cache"))
        return flavour, build.build(flavour).parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loader, "_loaded", {})  # load() must go through build() again
    return tmp_path / "cache"


@pytest.fixture
def stub(pristine, cache, monkeypatch):
    """The stub, verified and cached, standing in for the cpu flavour: returns its library."""
    flavour, folder = pristine
    shutil.copytree(folder, cache / folder.name)
    monkeypatch.setitem(build.FLAVOURS, "cpu", flavour)
    return cache / folder.name / build.library_path(flavour, "").name


def snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_unchanged(before):
    assert {p: p.read_bytes() for p in before} == before


def assert_auto_moves_on_and_flash_says(registry, caplog, line):
    assert select(registry, "attention_backends", "auto", REQUEST).name == "sdpa"
    assert f"attention backend 'flash' skipped by auto: {line}" in caplog.messages
    with pytest.raises(GptlabError) as e:  # the line itself, or within BackendNotSupportedError
        select(registry, "attention_backends", "flash", REQUEST)
    assert line in str(e.value)


# ------------------------------------------------------------- 1. damaged or foreign library
# Each writes a new file: changing the old one in place would crash a process that mapped it
# (this one, once a test has loaded the library), as it would any user's.
def replace(lib, data: bytes):
    lib.unlink()
    lib.write_bytes(data)


def truncate(lib):
    replace(lib, lib.read_bytes()[:1000])


def replace_with_foreign(lib):
    with open(_cffi_backend.__file__, "rb") as f:
        replace(lib, f.read())


def flip_a_byte(lib):
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    replace(lib, bytes(data))


def drop_record(lib):
    lib.with_name(build.RECORD).unlink()


@pytest.mark.parametrize("damage, reason", [
    (truncate, "it is 1000 bytes, its record says {size} (truncated or replaced)"),
    (replace_with_foreign, "it is {foreign} bytes, its record says {size} (truncated or replaced)"),
    (flip_a_byte, "its sha256 differs from its record (corrupted or replaced)"),
    (drop_record, "it has no size/sha256 record (built by an older gptlab)"),
], ids=["truncated", "foreign", "corrupted", "no-record"])
def test_a_damaged_or_foreign_library_is_rebuilt_not_loaded(stub, damage, reason, caplog):
    size = stub.stat().st_size
    damage(stub)
    reason = reason.format(size=size, foreign=os.path.getsize(_cffi_backend.__file__))
    assert build.library_problem(stub) == reason
    assert build.cached_library("cpu") is None  # `gpt backends` never loads it either
    assert build.build_library("cpu") == (stub, reason)
    assert f"rebuilding the cpu kernels: the cached {stub} failed verification: {reason}" in (
        caplog.messages)
    assert build.library_problem(stub) is None and build.cached_library("cpu") == stub
    assert NativeLibrary(stub).flavour == "cpu"


def test_auto_and_kernels_build_rebuild_a_truncated_library(stub, registry):
    size = stub.stat().st_size
    truncate(stub)
    assert select(registry, "attention_backends", "auto", REQUEST).name == "flash"  # rebuilt, then loaded
    assert build.library_problem(stub) is None
    truncate(stub)
    res = CliRunner().invoke(build_cli(registry), ["kernels", "build", "--flavour", "cpu"])
    assert res.exit_code == 0, res.output
    first, second = res.output.splitlines()
    assert first == ("cpu: rebuilt: the cached library failed verification: it is 1000 bytes, "
                     f"its record says {size} (truncated or replaced)")
    assert re.fullmatch(rf"cpu: {re.escape(str(stub))} \(ABI {ABI_VERSION}, flavour cpu, "
                        r"[\d.]+s\)", second)


def test_build_never_returns_a_library_that_fails_verification(stub, monkeypatch):
    size = stub.stat().st_size
    truncate(stub)
    monkeypatch.setattr(build, "_compile", lambda flavour, lib: None)  # "built", still truncated
    with pytest.raises(build.KernelBuildError) as e:
        build.build("cpu")
    assert str(e.value) == (f"the cpu kernels just built at {stub} fail verification (it is "
                            f"1000 bytes, its record says {size} (truncated or replaced)); set "
                            f"GPTLAB_KERNEL_CACHE to a folder on another disk")


def test_a_library_missing_a_function_is_a_kernel_error(tmp_path, cache, registry, caplog,
                                                       monkeypatch):
    (tmp_path / "partial.c").write_text(stub_source(omit="gptlab_flash_backward_f32"))
    partial = stub_flavour(tmp_path / "partial.c")
    lib = build.build(partial)  # its record matches: only loading can tell
    line = (f"{lib} lacks gptlab_flash_backward_f32(): it is not a gptlab kernel library; "
            f"rebuild it with `gpt kernels build --force`")
    with pytest.raises(KernelError) as e:
        NativeLibrary(lib)
    assert str(e.value) == line
    monkeypatch.setitem(build.FLAVOURS, "cpu", partial)
    assert_auto_moves_on_and_flash_says(registry, caplog, line)


# ------------------------------------------------------------- 2. a cache that cannot be used
@pytest.mark.parametrize("layout", ["cache-is-a-file", "cache-inside-a-file", "lock-is-a-folder",
                                    "library-folder-is-a-file"])
def test_an_unusable_cache_is_one_line_and_auto_moves_on(layout, tmp_path, cache, registry,
                                                         caplog, monkeypatch):
    folder = build.library_path(build.CPU, build.build_key(build.CPU)).parent.name
    if layout == "cache-is-a-file":
        cache.write_text("not a folder")
        bad, why = cache, "Not a directory"
    elif layout == "cache-inside-a-file":
        (tmp_path / "file").write_text("not a folder")
        bad, why = tmp_path / "file" / "kernels", "Not a directory"
        monkeypatch.setenv("GPTLAB_KERNEL_CACHE", str(bad))
    elif layout == "lock-is-a-folder":
        bad, why = cache / f"{folder}.lock", "Is a directory"
        bad.mkdir(parents=True)
        (bad / "somebody's").write_text("file")
    else:
        bad, why = cache / folder, "Not a directory"
        cache.mkdir()
        bad.write_text("not a folder")
    before = snapshot(tmp_path)
    line = (f"cannot use the kernel cache {bad}: {why}; set GPTLAB_KERNEL_CACHE to a writable "
            f"folder")
    with pytest.raises(build.KernelBuildError) as e:
        build.build("cpu")
    assert str(e.value) == line
    assert_auto_moves_on_and_flash_says(registry, caplog, line)
    assert_unchanged(before)


# ------------------------------------------------------------- 3. a lock held by another build
def test_a_held_lock_names_its_holder_and_times_out(cache, registry, caplog, monkeypatch):
    lock = build.library_path(build.CPU, build.build_key(build.CPU)).parent.with_suffix(".lock")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, time
        from gptlab.plugins.cuda_kernels import build
        build._lock(pathlib.Path({str(lock)!r}), build.CPU)
        print("locked", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert lock.read_text() == f"{holder.pid}\n"
        monkeypatch.setattr(build, "LOCK_TIMEOUT_S", 0.2)
        waiting = f"another build of the cpu kernels (pid {holder.pid}, lock {lock})"
        line = (f"timed out after 0.2s waiting for {waiting}; if that process is stuck, end it, "
                f"or set GPTLAB_KERNEL_CACHE to another folder")
        with pytest.raises(build.KernelBuildError) as e:
            build.build("cpu")
        assert str(e.value) == line
        assert caplog.messages == [f"waiting for {waiting}"]  # once, not every 50 ms
        caplog.clear()
        assert_auto_moves_on_and_flash_says(registry, caplog, line)
        assert lock.read_text() == f"{holder.pid}\n"
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------- 4. a killed build's .tmp files
def test_a_build_removes_its_folders_stale_tmp_files_only(pristine, cache, monkeypatch):
    flavour, folder = pristine
    monkeypatch.setitem(build.FLAVOURS, "cpu", flavour)
    own = cache / folder.name
    own.mkdir(parents=True)
    stale = [own / "libgptlab_cpu.so.k1ll3d.tmp", own / "build.log.k1ll3d.tmp"]
    for p in stale:
        p.write_bytes(b"half a library")
    other = cache / "cuda-emu-0123456789abcdef" / "libgptlab_cuda_emu.so.busy.tmp"
    other.parent.mkdir()
    other.write_bytes(b"another flavour's build in progress")
    lib = build.build("cpu")
    assert not any(p.exists() for p in stale)
    assert other.read_bytes() == b"another flavour's build in progress"
    assert sorted(p.name for p in own.iterdir()) == ["build.log", lib.name, build.RECORD]
    assert build.library_problem(lib) is None


# ------------------------------------------------------------- 5. a flavour asked for by name
@pytest.mark.parametrize("args, exit_code, output", [
    (["--flavour", "cpu"], 1, "Error: cannot build --flavour cpu: compiler for the cpu kernels "
                              "not found ('/nonexistent/cc'; install gcc or set CC)\n"),
    ([], 0, "cpu: skipped: compiler for the cpu kernels not found ('/nonexistent/cc'; install "
            "gcc or set CC)\n"
            "cuda: skipped: compiler for the cuda kernels not found ('/nonexistent/nvcc'; "
            "install the CUDA toolkit or set NVCC)\n"
            "cuda-emu: skipped: compiler for the cuda-emu kernels not found "
            "('/nonexistent/c++'; install g++ or set CXX)\n"
            "cuda-emu-racecheck: skipped: compiler for the cuda-emu-racecheck kernels not found "
            "('/nonexistent/c++'; install g++ or set CXX)\n"
            "cuda-emu-numerics: skipped: compiler for the cuda-emu-numerics kernels not found "
            "('/nonexistent/c++'; install g++ or set CXX)\n"),
], ids=["named", "all"])
def test_kernels_build_fails_for_a_named_flavour_it_skips(args, exit_code, output, cache,
                                                         registry, monkeypatch):
    for flavour in build.FLAVOURS.values():
        monkeypatch.setenv(flavour.compiler_env, f"/nonexistent/{flavour.default_compiler}")
    res = CliRunner().invoke(build_cli(registry), ["kernels", "build", *args])
    assert (res.exit_code, res.output) == (exit_code, output)
