"""The CUDA emulator itself (csrc/emu/), on its own kernels (emu/selftest.cu): deadlocks are
launch errors, unwritten shared memory reads NaN, shuffles are right, a race changes results
between schedules, the hardware's launch limits hold."""

from pathlib import Path

import cffi
import pytest
import torch

from gptlab.core.errors import ConfigError
from gptlab.plugins.cuda_kernels import build, emulator

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def selftest():
    flavour = build.Flavour(
        name="emu-selftest", compiler_env="CXX", default_compiler="c++",
        sources=(str(HERE / "emu" / "selftest.cu"), "emu/cuda_emu.cpp"),
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
