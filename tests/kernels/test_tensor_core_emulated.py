"""The emulator's tensor-core primitives (gptlab/verify/emu/cuda_emu_tc.h through the plugin's
csrc/cuda/tensor_core.cuh), on the kernels of emu/tc_selftest.cu.

Fragment layouts are checked for every (lane, register element) against two independent sources:
the PTX ISA's formulas (section "Matrix Fragments for mma.m16n8k16 with floating point type" and
"ldmatrix": groupID = lane >> 2, threadID_in_group = lane % 4), and CUTLASS's CuTe layouts for
the same instructions (include/cute/atom/mma_traits_sm80.hpp: MMA_Traits of
SM80_16x8x16_F32BF16BF16F32_TN / F16; include/cute/atom/copy_traits_sm75.hpp: Copy_Traits of
SM75_U32x{1,2,4}_LDSM_N and SM75_U16x{2,4,8}_LDSM_T), encoded here as (shape, stride) and
evaluated by a small CuTe-style layout function. Then the emulated instructions themselves:
ldmatrix against memory, mma against a float64 matmul of the rounded inputs, bfloat16 / float16
rounding against torch's, cp.async's completion at the wait, what a barrier makes visible to
ldmatrix and cp.async (and the race detector's view of them), and the launch errors of a lane
that is missing or at another instruction.
"""

import re
from pathlib import Path

import cffi
import numpy as np
import pytest
import torch

from gptlab.plugins.cuda_kernels import build
from gptlab.verify import emulator

HERE = Path(__file__).resolve().parent


def selftest(racecheck: bool = False, base: build.Flavour | None = None):
    base = base or (build.CUDA_EMU_RACECHECK if racecheck else build.CUDA_EMU)
    flavour = build.Flavour(
        name=f"emu-tc-selftest-{base.name}", compiler_env="CXX", default_compiler="c++",
        sources=(str(HERE / "emu" / "tc_selftest.cu"), str(build.EMU_DIR / "cuda_emu.cpp")),
        headers=("cuda/*.cuh",), include_dirs=base.include_dirs, flags=base.all_flags(),
        native_cpu=base.native_cpu)
    ffi = cffi.FFI()
    ffi.cdef("""
        int tc_layout(int kind, int lane, int i, int *row, int *col);
        void tc_round(int to, const float *in, uint16_t *out, int64_t n);
        void tc_widen(int from, const uint16_t *in, float *out, int64_t n);
        int tc_mma(int dtype, float *d, const uint32_t *a, const uint32_t *b, int warps);
        int tc_ldmatrix(int num, int trans, uint32_t *out, const uint16_t *mat);
        int tc_scenario(const char *name, float *out, const float *src, char *msg, int len);
    """)
    return Lib(ffi, ffi.dlopen(str(build.build(flavour))))


@pytest.fixture(scope="module")
def tc():
    return selftest()


@pytest.fixture(scope="module")
def tc_racecheck():
    return selftest(racecheck=True)


class Lib:
    def __init__(self, ffi, lib):
        self.ffi, self.lib = ffi, lib

    def __getattr__(self, name):
        return getattr(self.lib, name)


def ptr(lib, t: torch.Tensor, ctype: str):
    return lib.ffi.cast(ctype, t.data_ptr())


# ------------------------------------------------------------------ the two independent tables
def ptx_table(kind: str, lane: int, i: int) -> tuple[int, int]:
    """(row, col) from the PTX ISA's formulas, written out case by case as in its tables."""
    g, t = lane >> 2, lane % 4
    if kind == "A":  # a0..a7: rows g, g, g+8, g+8, g, g, g+8, g+8; cols +8 from a4 on
        return g + (8 if i in (2, 3, 6, 7) else 0), t * 2 + (i & 1) + (8 if i >= 4 else 0)
    if kind == "B":  # b0..b3: row (k) = t*2 + (i & 1) for b0, b1; +8 for b2, b3; col (n) = g
        return t * 2 + (i & 1) + (8 if i >= 2 else 0), g
    if kind == "C":  # c0..c3: row g for c0, c1, g+8 for c2, c3; col t*2 + (i & 1)
        return g + (8 if i >= 2 else 0), t * 2 + (i & 1)
    if kind == "ld":  # each lane: row g, cols 2t, 2t+1 of each 8x8 matrix
        return g, 2 * t + i
    if kind == "ld.trans":  # the transposed matrix: source row 2t + i, col g
        return 2 * t + i, g
    raise ValueError(kind)


def cute(shape, stride, index: int) -> int:
    """CuTe's layout function: ``index`` split colexicographically over the (nested) shape,
    dotted with the stride."""
    if isinstance(shape, int):
        return (index % shape) * stride
    off = 0
    for s, d in zip(shape, stride):
        size = _size(s)
        off += cute(s, d, index % size)
        index //= size
    return off


def _size(shape) -> int:
    return shape if isinstance(shape, int) else int(np.prod([_size(s) for s in shape]))


# mma_traits_sm80.hpp, MMA_Traits<SM80_16x8x16_F16F16F16F16_TN> (the F32BF16BF16F32 and
# F32F16F16F32 traits inherit its layouts): (thread, value) -> offset in a column-major
# (M, K) = (16, 16) A, (N, K) = (8, 16) B, (M, N) = (16, 8) C (SM80_16x8_Row)
CUTLASS_MMA = {
    "A": (((4, 8), (2, 2, 2)), ((32, 1), (16, 8, 128)), 16),
    "B": (((4, 8), (2, 2)), ((16, 1), (8, 64)), 8),
    "C": (((4, 8), (2, 2)), ((32, 1), (16, 8)), 16),
}
# copy_traits_sm75.hpp: DstLayout, (thread, value) -> bit of the 8x8 b16 matrices, each
# matrix's rows given by consecutive threads (SrcLayout: thread r supplies row r, 128 bits)
CUTLASS_LDSM = {
    (1, False): ((32, 32), (32, 1)),                                   # SM75_U32x1_LDSM_N
    (2, False): ((32, (32, 2)), (32, (1, 1024))),                      # SM75_U32x2_LDSM_N
    (4, False): ((32, (32, 4)), (32, (1, 1024))),                      # SM75_U32x4_LDSM_N
    (1, True): (((4, 8), (16, 2)), ((256, 16), (1, 128))),             # SM75_U16x2_LDSM_T
    (2, True): (((4, 8), (16, 2, 2)), ((256, 16), (1, 128, 1024))),    # SM75_U16x4_LDSM_T
    (4, True): (((4, 8), (16, 2, 4)), ((256, 16), (1, 128, 1024))),    # SM75_U16x8_LDSM_T
}


def cutlass_mma(kind: str, lane: int, i: int) -> tuple[int, int]:
    shape, stride, rows = CUTLASS_MMA[kind]
    off = cute(shape[0], stride[0], lane) + cute(shape[1], stride[1], i)
    if kind == "B":  # (N, K) column-major: n = off % 8, k = off // 8; our B is (k, n)
        return off // rows, off % rows
    return off % rows, off // rows


def cutlass_ldmatrix(num: int, trans: bool, lane: int, reg: int, half: int):
    """(matrix, row, col) in memory of half ``half`` of register ``reg`` of ``lane``."""
    shape, stride = CUTLASS_LDSM[num, trans]
    value = 16 * half + 32 * reg  # the value index of the half's first bit
    bit = cute(shape[0], stride[0], lane) + cute(shape[1], stride[1], value)
    e = bit // 16
    return e // 64, e % 64 // 8, e % 8


KINDS = {"A": (0, 8), "B": (1, 4), "C": (2, 4), "ld": (3, 2), "ld.trans": (4, 2)}


def emulator_table(tc, kind):
    code, n = KINDS[kind]
    row, col = tc.ffi.new("int *"), tc.ffi.new("int *")
    out = {}
    for lane in range(32):
        for i in range(n):
            assert tc.tc_layout(code, lane, i, row, col) == 0
            out[lane, i] = (row[0], col[0])
    return out


@pytest.mark.parametrize("kind", ["A", "B", "C"])
def test_mma_fragment_tables_match_ptx_and_cutlass(tc, kind):
    table = emulator_table(tc, kind)
    _, n = KINDS[kind]
    rows, cols = {"A": (16, 16), "B": (16, 8), "C": (16, 8)}[kind]
    for (lane, i), rc in table.items():
        assert rc == ptx_table(kind, lane, i), (kind, lane, i)
        assert rc == cutlass_mma(kind, lane, i), (kind, lane, i)
    assert sorted(table.values()) == [(r, c) for r in range(rows) for c in range(cols)]


def test_ldmatrix_tables_match_ptx_and_cutlass(tc):
    for trans in (False, True):
        table = emulator_table(tc, "ld.trans" if trans else "ld")
        for num in (1, 2, 4):
            for lane in range(32):
                for reg in range(num):
                    for half in range(2):
                        want = (reg, *ptx_table("ld.trans" if trans else "ld", lane, half))
                        assert (reg, *table[lane, half]) == want
                        assert cutlass_ldmatrix(num, trans, lane, reg, half) == want


# ------------------------------------------------------------------ the instructions
@pytest.mark.parametrize("num", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_reads_shared_memory_by_the_table(tc, num, trans):
    mat = (torch.arange(32 * 8, dtype=torch.int32) * 7 + 1000).to(torch.int16).view(32, 8)
    out = torch.zeros(32, 4, dtype=torch.int32)
    assert tc.tc_ldmatrix(num, int(trans), ptr(tc, out, "uint32_t *"),
                          ptr(tc, mat, "uint16_t *")) == 0
    regs = out.numpy().view(np.uint32)
    m = mat.numpy().view(np.uint16)
    for lane in range(32):
        for reg in range(4):
            for half in range(2):
                got = (int(regs[lane, reg]) >> (16 * half)) & 0xFFFF
                if reg >= num:
                    assert got == 0  # registers past x{num} are not written
                    continue
                r, c = ptx_table("ld.trans" if trans else "ld", lane, half)
                assert got == m[8 * reg + r, c], (num, trans, lane, reg, half)


def to_bits(x: torch.Tensor, dtype) -> np.ndarray:
    return x.to(dtype).view(torch.int16).numpy().view(np.uint16)


def pack_fragments(mat: torch.Tensor, kind: str, dtype) -> torch.Tensor:
    """Per-lane registers of ``mat`` (16x16 A or 16x8 B) by the PTX table: (32, n / 2) uint32."""
    _, n = KINDS[kind]
    bits = to_bits(mat, dtype)
    regs = np.zeros((32, n // 2), dtype=np.uint32)
    for lane in range(32):
        for i in range(n):
            r, c = ptx_table(kind, lane, i)
            regs[lane, i // 2] |= np.uint32(bits[r, c]) << np.uint32(16 * (i & 1))
    return torch.from_numpy(regs.view(np.int32).copy())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mma_is_a_float32_accumulated_matmul_of_the_rounded_inputs(tc, dtype):
    warps = 16
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(warps, 16, 16, generator=gen).to(dtype)
    B = torch.randn(warps, 16, 8, generator=gen).to(dtype)
    A[0], B[0] = 0, 0
    A[0, 3, 5], B[0, 5, 6] = 1, 1  # one product: locates (row 3, col 6) in C
    A[1] *= 1e3  # large magnitudes and a wide range within a sum
    C = torch.randn(warps, 16, 8, generator=gen)
    a = torch.stack([pack_fragments(A[w], "A", dtype) for w in range(warps)])
    b = torch.stack([pack_fragments(B[w], "B", dtype) for w in range(warps)])
    d = torch.zeros(warps, 32, 4)
    for w in range(warps):
        for lane in range(32):
            for i in range(4):
                d[w, lane, i] = C[w][ptx_table("C", lane, i)]
    assert tc.tc_mma(int(dtype == torch.float16), ptr(tc, d, "float *"),
                     ptr(tc, a, "uint32_t *"), ptr(tc, b, "uint32_t *"), warps) == 0
    got = torch.zeros(warps, 16, 8, dtype=torch.float64)
    for lane in range(32):
        for i in range(4):
            got[:, ptx_table("C", lane, i)[0], ptx_table("C", lane, i)[1]] = d[:, lane, i].double()
    ref = A.double() @ B.double() + C.double()
    bound = (A.double().abs() @ B.double().abs() + C.double().abs()) * 17 * 2.0 ** -24
    assert ((got - ref).abs() <= bound).all(), (got - ref).abs().max()
    one = torch.zeros(16, 8, dtype=torch.bool)
    one[3, 6] = True
    assert got[0, 3, 6] == (C[0, 3, 6] + 1).double()  # float32 add
    assert torch.equal(got[0][~one], C[0].double()[~one])


def conversion_inputs() -> torch.Tensor:
    """Floats around every hard case of bf16 / f16 rounding: subnormals of both, exact ties,
    overflow boundaries, signed zeros, infinities, NaN; and random values over the whole range."""
    gen = torch.Generator().manual_seed(1)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0,
                            65519.99, 65520.0, 65536.0, 6.1035156e-05, 5.9604645e-08,
                            2.9802322e-08, 2.9802326e-08, 8.940697e-08, 3.3895314e38,
                            3.4028235e38, 1e-45, 1.1754942e-38, 1.1754944e-38])
    # every float whose low 16 (bf16) or 13 (f16) bits are a tie, or one ulp around it
    base = torch.randint(0, 1 << 31, (20000,), generator=gen, dtype=torch.int64)
    ties16 = (base & ~0xFFFF) | 0x8000
    ties13 = (base & ~0x1FFF) | 0x1000
    around = torch.cat([ties16, ties16 + 1, ties16 - 1, ties13, ties13 + 1, ties13 - 1, base])
    bits = torch.cat([around, around | (1 << 31)])
    as_float = torch.from_numpy(bits.numpy().astype(np.uint32).view(np.float32).copy())
    # f16's range and subnormals, densely
    small = torch.randn(20000, generator=gen) * torch.logspace(-9, 5, 20000).float()
    return torch.cat([special, -special, as_float, small])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_conversions_round_to_nearest_even_like_torch(tc, dtype):
    x = conversion_inputs().contiguous()
    out = torch.zeros(x.numel(), dtype=torch.int16)
    tc.tc_round(int(dtype == torch.float16), ptr(tc, x, "float *"), ptr(tc, out, "uint16_t *"),
                x.numel())
    got = out.view(dtype)
    want = x.to(dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    mismatch = (got.view(torch.int16) != want.view(torch.int16)) & ~nan
    assert not mismatch.any(), (x[mismatch][:5], got[mismatch][:5], want[mismatch][:5])
    # and back: every one of the 65536 bit patterns widens exactly as torch's
    allbits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    wide = torch.zeros(65536)
    tc.tc_widen(int(dtype == torch.float16), ptr(tc, allbits, "uint16_t *"),
                ptr(tc, wide, "float *"), 65536)
    ref = allbits.view(dtype).float()
    assert torch.equal(torch.isnan(wide), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    assert torch.equal(wide[ok].view(torch.int32), ref[ok].view(torch.int32))


def scenario(tc, name, n=1024, src=None, schedule="inorder"):
    out = torch.zeros(n)
    src = torch.arange(1.0, 1025.0) if src is None else src
    msg = tc.ffi.new("char[512]")
    with emulator.schedule(schedule):
        rc = tc.tc_scenario(name.encode(), ptr(tc, out, "float *"), ptr(tc, src, "float *"), msg,
                            512)
    return rc, tc.ffi.string(msg).decode(), out


def test_cp_async_lands_only_at_its_wait_group(tc):
    rc, msg, out = scenario(tc, "cp_async_timing", n=2 * 64 * 6)
    assert rc == 0, msg
    out = out.view(2, 64, 6)
    t = torch.arange(64).float()
    assert torch.isnan(out[..., 0]).all() and torch.isnan(out[..., 1]).all()  # before any wait
    assert torch.equal(out[..., 2], (8 * t + 1).expand(2, 64))  # wait_group 1: group 0 landed
    assert torch.isnan(out[..., 3]).all()  # ... group 1 not yet
    assert torch.equal(out[..., 4], (8 * t + 6).expand(2, 64))  # wait_group 0: all landed
    assert torch.equal(out[..., 5], torch.zeros(2, 64))  # past src-size: zero filled


def test_cp_async_needs_a_barrier_before_other_threads_read(tc):
    want = torch.arange(1.0, 129.0)
    for schedule in ("inorder", "random:1", "random:2"):
        rc, msg, out = scenario(tc, "cp_async_visibility", n=128, schedule=schedule)
        assert rc == 0 and torch.equal(out, want), msg
    seen_nan = any(torch.isnan(scenario(tc, "cp_async_no_barrier", n=128, schedule=s)[2]).any()
                   for s in ("random:1", "random:2", "random:3", "random:4"))
    assert seen_nan  # some warp read before the copying warp's wait


def test_warp_collectives_need_every_lane_at_the_same_instruction(tc):
    rc, msg, _ = scenario(tc, "mma_lane_exited")
    assert rc == 719 and "waits for lane 31 of warp 0, which exited" in msg
    rc, msg, _ = scenario(tc, "mma_two_sites")
    assert rc == 719 and "is not at the same instruction" in msg and "tc_selftest.cu:" in msg
    rc, msg, _ = scenario(tc, "ldmatrix_unaligned")
    assert rc == 719 and "not 16-byte aligned" in msg
    rc, msg, _ = scenario(tc, "ldmatrix_from_global")
    assert rc == 719 and "not in the shared memory the launch asked for" in msg


def test_ldmatrix_past_the_launchs_shared_memory_is_a_launch_error(tc):
    """The emulator keeps 48 KiB per block; ldmatrix must stay within the bytes the launch asked
    for (before, anything under 48 KiB passed, reading the poison)."""
    rc, msg, _ = scenario(tc, "ldmatrix_past_launch_smem")
    assert rc == 719 and "ldmatrix: a row address is not in the shared memory the launch " \
                         "asked for (tc_selftest.cu:" in msg and msg.endswith("thread 16"), msg


def test_the_gpu_numerics_flavour_sums_mma_in_another_order(tc):
    """One C element's 16 products: 2^24 then fifteen 1s. In k order onto C each 1 is lost to
    rounding (2^24 + 1 ties to even, down); summed pairwise first (cuda-emu-numerics) they give
    2^24 + 14. PTX leaves the order open; a GPU may do either."""
    gpu = selftest(base=build.CUDA_EMU_NUMERICS)
    A, B = torch.zeros(16, 16), torch.zeros(16, 8)
    A[0, :] = 1
    A[0, 0], B[0, 0] = 2.0 ** 12, 2.0 ** 12
    B[1:, 0] = 1
    a = pack_fragments(A.bfloat16(), "A", torch.bfloat16)
    b = pack_fragments(B.bfloat16(), "B", torch.bfloat16)
    results = []
    for lib in (tc, gpu):
        d = torch.zeros(32, 4)
        assert lib.tc_mma(0, ptr(lib, d, "float *"), ptr(lib, a, "uint32_t *"),
                          ptr(lib, b, "uint32_t *"), 1) == 0
        results.append(d[0, 0].item())  # lane 0, c0: row 0, col 0
    assert results == [2.0 ** 24, 2.0 ** 24 + 14]


def test_ldmatrix_needs_a_barrier_after_another_warp_writes(tc):
    rc, msg, out = scenario(tc, "ldmatrix_visibility", n=32)
    assert rc == 0 and torch.equal(out, torch.arange(32.0, 64.0)), msg
    # each lane reads its row when it arrives: in warp order, before warp 1 has written; so
    # every half is the poison's (0x7fc0dead, shared memory before the block) low half
    rc, msg, out = scenario(tc, "ldmatrix_no_barrier", n=32)
    assert rc == 0 and torch.equal(out, torch.full((32,), float(0xDEAD))), msg


def test_racecheck_sees_shared_memory_through_ldmatrix_and_cp_async(tc_racecheck):
    """ldmatrix records a read of each row by the lane that names it; cp.async a write of its
    destination at the issue and at the wait that completes it."""
    for name in ("ldmatrix_visibility", "cp_async_visibility"):
        rc, msg, _ = scenario(tc_racecheck, name, n=128)
        assert rc == 0, msg
    rc, msg, _ = scenario(tc_racecheck, "ldmatrix_no_barrier", n=32)
    assert rc == 719 and re.search(r"race on shared memory, float 0: a write by thread "
                                   r"\(32, 0, 0\) at tc_selftest.cu:\d+ and a read by thread "
                                   r"\(0, 0, 0\) at tc_selftest.cu:\d+", msg), msg
    rc, msg, _ = scenario(tc_racecheck, "cp_async_no_barrier", n=128)
    assert rc == 719 and "race on shared memory" in msg and "a write by thread (0, 0, 0)" in msg, \
        msg
