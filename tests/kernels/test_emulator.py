"""The CUDA emulator itself (gptlab/verify/emu/), on its own kernels (emu/selftest.cu):
deadlocks are launch errors under every schedule, unwritten shared memory reads NaN, shuffles are
right, a race changes results between schedules, greedy and reverse expose what lockstep hides,
blocks interleave, the race detector flags what no schedule shows (and nothing in correct
kernels), $GPTLAB_EMU_MUTATE removes one site, the hardware's launch limits hold."""

from pathlib import Path

import cffi
import pytest
import torch

from gptlab.core.errors import ConfigError
from gptlab.plugins.cuda_kernels import build
from gptlab.verify import emulator

HERE = Path(__file__).resolve().parent


SELFTEST = HERE / "emu" / "selftest.cu"


def _selftest(racecheck: bool, base: build.Flavour | None = None):
    base = base or (build.CUDA_EMU_RACECHECK if racecheck else build.CUDA_EMU)
    flavour = build.Flavour(
        name=f"emu-selftest-{base.name}", compiler_env="CXX",
        default_compiler="c++", sources=(str(SELFTEST), str(build.EMU_DIR / "cuda_emu.cpp")),
        headers=(), include_dirs=base.include_dirs, flags=base.all_flags(),
        native_cpu=base.native_cpu)
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


@pytest.fixture(scope="module")
def selftest():
    return _selftest(racecheck=False)


@pytest.fixture(scope="module")
def racecheck():
    """The selftest kernels built with -DGL_EMU_RACECHECK (flavour cuda-emu-racecheck's flags)."""
    return _selftest(racecheck=True)


@pytest.fixture(scope="module")
def gpu_numerics():
    """The selftest kernels built with the flags of flavour cuda-emu-numerics."""
    return _selftest(racecheck=False, base=build.CUDA_EMU_NUMERICS)


def site(marker: str) -> str:
    """"selftest.cu:LINE" of the one line of selftest.cu that contains ``marker``."""
    lines = [i for i, text in enumerate(SELFTEST.read_text().splitlines(), 1) if marker in text]
    assert len(lines) == 1, (marker, lines)
    return f"selftest.cu:{lines[0]}"


@pytest.mark.parametrize("schedule", emulator.ALL_SCHEDULES)
def test_emulator_reports_a_barrier_not_all_threads_reach(selftest, schedule):
    rc, msg, _ = selftest("partial_barrier", schedule=schedule)
    assert rc == 719  # cudaErrorLaunchFailure, not a hang
    assert "__syncthreads (selftest.cu:" in msg and "reached by 16 of 32 threads" in msg
    assert "threads 0-15 wait at __syncthreads" in msg and "threads 16-31 exited" in msg
    rc, msg, _ = selftest("divergent_barriers", schedule=schedule)
    assert rc == 719 and "barrier deadlock" in msg
    assert "threads 0-31 wait at __syncthreads (selftest.cu:" in msg
    assert "threads 32-63 wait at __syncthreads (selftest.cu:" in msg
    rc, msg, _ = selftest("shuffle_after_exit", schedule=schedule)
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
    with pytest.raises(ConfigError, match="inorder, reverse, greedy, random or random:SEED"):
        selftest("nothing", schedule="sideways")
    with pytest.raises(ConfigError, match="mutation site must be FILE:LINE"):
        emulator.mutate("flash.cu")
    monkeypatch.setenv(emulator.SCHEDULE_ENV, "sideways")  # the emulator checks it too
    lib = selftest.__wrapped__
    rc, msg = lib("nothing")
    assert rc == 1 and "GPTLAB_EMU_SCHEDULE must be inorder, reverse, greedy, random or " \
                       "random:SEED, got 'sideways'" in msg
    monkeypatch.setenv(emulator.SCHEDULE_ENV, "greedy")
    monkeypatch.setenv(emulator.MUTATE_ENV, "flash.cu:0")
    rc, msg = lib("nothing")
    assert rc == 1 and "GPTLAB_EMU_MUTATE must be FILE:LINE (e.g. flash.cu:149), got " \
                       "'flash.cu:0'" in msg


def test_reads_past_the_launchs_shared_memory_are_launch_errors_where_seen(selftest, racecheck):
    """The emulator keeps 48 KiB per block, but a launch owns only the bytes it asked for: past
    them a GPU holds another block's memory. A plain read there gives NaN; under racecheck every
    access is checked as it happens (before: only writes, after the block)."""
    rc, msg, out = selftest("smem_overread", n=32)
    assert rc == 0 and torch.isnan(out).all()
    rc, msg, _ = racecheck("smem_overread", n=32)
    assert rc == 719, msg
    assert (f"a read of float 32 of dynamic shared memory ({site('the read past the launch')}), "
            f"past the 128 bytes the launch asked for") in msg


def numerics_inputs() -> torch.Tensor:
    out = torch.zeros(82)
    one = 1 + 2.0 ** -12
    out[:4] = torch.tensor([one, one, 1 + 2.0 ** -11, 1e-40])  # a*b is 1 + 2^-11 + 2^-24
    out[16:48] = torch.linspace(-20.3, 17.9, 32)
    return out


def test_the_gpu_numerics_flavour_computes_as_a_gpu_may(selftest, gpu_numerics):
    """cuda-emu-numerics: a * b - c contracted into one FMA (the rounding of a * b is kept),
    atomicAdd flushing a subnormal to zero, exp2f off by up to 2 ulp (the CUDA C++ Programming
    Guide's bound), exactly where the default flavour gives the correctly rounded results."""
    def run(lib):
        out = numerics_inputs()
        rc, msg = lib.__wrapped__("numerics", out)
        assert rc == 0, msg
        return out

    plain, gpu = run(selftest), run(gpu_numerics)
    assert plain[48] == 0 and gpu[48] == 2.0 ** -24
    assert plain[49] == torch.tensor(1e-40) and gpu[49] == 0
    x = numerics_inputs()[16:48].double()
    exact = torch.exp2(x).float()
    assert torch.equal(plain[50:], exact)
    ulps = (gpu[50:].view(torch.int32) - exact.view(torch.int32)).abs()
    assert ulps.max() == 2 and (ulps > 0).sum() >= 16


# ------------------------------------------------------------------------ schedules
def test_greedy_exposes_a_tile_overwritten_while_other_warps_read_it(selftest):
    """tile_reuse without its loop-top barrier: lockstep schedules read every tile before any
    warp overwrites it; greedy lets warp 0 overwrite its tile before warp 3 read it."""
    t = torch.arange(128)
    expected = ((t + 32) % 128 + ((t + 32) % 128 + 128)).float().repeat(2)
    for schedule in emulator.ALL_SCHEDULES:
        rc, _, out = selftest("tile_reuse", n=256, schedule=schedule)
        assert rc == 0 and torch.equal(out, expected), schedule
    for schedule in ("inorder", "reverse", "random:1"):
        assert torch.equal(selftest("tile_reuse_unsynced", n=256, schedule=schedule)[2],
                           expected), schedule
    out = selftest("tile_reuse_unsynced", n=256, schedule="greedy")[2]
    assert not torch.equal(out, expected)
    assert torch.equal(out[:96], expected[:96])  # warps 0-2 read tiles not yet overwritten


def test_reverse_runs_warps_and_lanes_backwards(selftest):
    expected = torch.arange(-1.0, 63.0)
    expected[0] = -1.0
    for schedule in ("inorder", "greedy"):  # lanes, and warps, in index order
        assert torch.equal(selftest("read_previous", n=64, schedule=schedule)[2], expected)
    out = selftest("read_previous", n=64, schedule="reverse")[2]
    assert out[0] == -1.0 and torch.isnan(out[1:]).all()  # nobody had written yet


def test_blocks_interleave_under_every_schedule_but_inorder(selftest):
    """8 blocks take a ticket at their start and one after their barrier: inorder runs them one
    after another; the others keep 4 blocks resident at once."""
    def in_flight(out):
        spans = out[:16].view(8, 2)
        return max(int(((spans[:, 0] <= t) & (t < spans[:, 1])).sum()) for t in range(16))

    rc, _, out = selftest("tickets", n=16)
    assert rc == 0 and torch.equal(out, torch.arange(16.0)) and in_flight(out) == 1
    for schedule in ("reverse", "greedy", "random:1", "random:2"):
        rc, _, out = selftest("tickets", n=16, schedule=schedule)
        assert rc == 0 and sorted(out.tolist()) == list(range(16)), schedule
        # round robin over 4 slots; random: a random slot each round
        assert in_flight(out) == 4 if schedule in ("reverse", "greedy") else in_flight(out) > 1
    assert selftest("tickets", n=16, schedule="reverse")[2][14] == 0  # block 7 starts first


# ------------------------------------------------------------------------ racecheck
def test_racecheck_flags_a_shuffle_standing_in_for_syncwarp(selftest, racecheck):
    lane = torch.arange(128) % 32
    expected = ((lane + 1) % 32).float()
    for schedule in emulator.ALL_SCHEDULES:  # no schedule shows it
        rc, _, out = selftest("publish_then_shuffle_unsynced", n=128, schedule=schedule)
        assert rc == 0 and torch.equal(out, expected), schedule
    rc, msg, _ = racecheck("publish_then_shuffle_unsynced", n=128)
    assert rc == 719, msg
    line = int(site("= smem[t - lane + (lane + 1) % 32]").split(":")[1])
    assert msg.startswith("kernel publish_then_shuffle<false>, block (0, 0, 0): race on shared "
                          "memory, float "), msg
    assert f"a read by thread (0, 0, 0) at selftest.cu:{line}" in msg
    assert f"a write by thread (1, 0, 0) at selftest.cu:{line - 3}" in msg
    assert "with no __syncthreads (or __syncwarp, in one warp) between them" in msg
    rc, msg, out = racecheck("publish_then_shuffle", n=128)
    assert rc == 0 and msg == "" and torch.equal(out, expected)


def test_racecheck_flags_a_plain_add_from_several_blocks(selftest, racecheck):
    for scenario in ("cross_block_plain", "cross_block_atomic"):
        rc, _, out = selftest(scenario, n=32, schedule="random:1")
        assert rc == 0 and torch.equal(out, torch.full((32,), 4.0))  # right, by luck
    rc, msg, _ = racecheck("cross_block_plain", n=32)
    line = site("else out[threadIdx.x] += 1.f;").split(":")[1]
    assert rc == 719 and "block (1, 0, 0): race on global memory at 0x" in msg, msg
    assert (f"a read by thread (0, 0, 0) at selftest.cu:{line} and a write by block (0, 0, 0) "
            f"thread (0, 0, 0) at selftest.cu:{line}, with no order between blocks of a launch "
            f"(only atomicAdd may meet atomicAdd)") in msg
    rc, msg, out = racecheck("cross_block_atomic", n=32)
    assert rc == 0 and msg == "" and torch.equal(out, torch.full((32,), 4.0))


@pytest.mark.parametrize("schedule", emulator.ALL_SCHEDULES)
def test_racecheck_passes_correct_kernels(racecheck, schedule):
    for scenario, n in (("no_race", 1024), ("tile_reuse", 256), ("shuffles", 192),
                        ("smem_per_block", 64), ("publish_then_shuffle", 128),
                        ("cross_block_atomic", 32), ("tickets", 16)):
        rc, msg, _ = racecheck(scenario, n=n, schedule=schedule)
        assert rc == 0 and msg == "", (scenario, msg)


def test_racecheck_flags_missing_barriers_whatever_the_schedule(racecheck):
    for scenario in ("race", "tile_reuse_unsynced", "read_previous"):
        for schedule in emulator.ALL_SCHEDULES:
            rc, msg, _ = racecheck(scenario, schedule=schedule)
            assert rc == 719 and "race on shared memory" in msg, (scenario, schedule, msg)


# ------------------------------------------------------------------------ mutation
def test_mutation_removes_one_barrier_or_atomic(selftest, racecheck):
    expected = ((torch.arange(128) + 32) % 128 + 1).float().repeat(8)
    barrier = site("neighbour's second barrier")
    rc, _, out = selftest("no_race")
    assert rc == 0 and torch.equal(out, expected)
    with emulator.mutate(barrier):
        assert not torch.equal(selftest("no_race")[2], expected)
    with emulator.mutate("selftest.cu:1"):  # a line with no site changes nothing
        assert torch.equal(selftest("no_race")[2], expected)
    atomic = site("if (ATOMIC) atomicAdd(")
    with emulator.mutate(atomic):
        rc, msg, out = racecheck("cross_block_atomic", n=32)
    assert rc == 719 and "race on global memory" in msg, msg
    assert (f"a read by thread (0, 0, 0) at {atomic} and a write by block (0, 0, 0) thread "
            f"(0, 0, 0) at {atomic}") in msg
