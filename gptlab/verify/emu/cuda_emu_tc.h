/* The CUDA emulator's tensor-core subset (sm_80): bfloat16 / float16 storage types, the warp
 * matrix multiply-accumulate mma.sync.m16n8k16, ldmatrix, and cp.async with its groups.
 * Included by the plugin's csrc/cuda/tensor_core.cuh under a host compiler only (under nvcc that
 * header uses cuda_bf16.h, cuda_fp16.h and inline PTX).
 *
 * Fragment layouts are written once, below (namespace gl_emu::frag), from the PTX ISA (8.x/9.x,
 * chapter "Instruction Set", sections cited by title):
 *   - "Warp Level Matrix Multiply-Accumulate Instructions" > "Matrix Fragments for
 *     mma.m16n8k16 with floating point type" (figures and formulas for A, B, C/D): with
 *     groupID = laneid >> 2 and threadID_in_group = laneid % 4,
 *       A (16x16, .row): a_i, i = 0..7, row = groupID + 8 * ((i / 2) % 2)  (i = 0,1,4,5: groupID)
 *                                        col = 2 * threadID_in_group + (i % 2) + 8 * (i / 4)
 *       B (16x8, .col):  b_i, i = 0..3, row (k) = 2 * threadID_in_group + (i % 2) + 8 * (i / 2)
 *                                        col (n) = groupID
 *       C, D (16x8):     c_i, i = 0..3, row = groupID + 8 * (i / 2)
 *                                        col = 2 * threadID_in_group + (i % 2)
 *     each pair of b16 elements (a_0 a_1, ...) packed in one 32-bit register, lower index in
 *     the lower 16 bits;
 *   - "Warp-level matrix load instruction: ldmatrix" (its fragment-layout figures and the
 *     operand description): lanes 8j..8j+7 give the row addresses of matrix j (x1: lanes
 *     0-7, x2: 0-15, x4: 0-31; the other lanes' addresses are ignored); register j of every
 *     lane holds matrix j's elements (row groupID, cols 2 * threadID_in_group + {0, 1}), with
 *     .trans those of the transposed matrix, i.e. source (row 2 * threadID_in_group + {0, 1},
 *     col groupID). Row addresses are 16-byte aligned, in shared memory;
 *   - "Data Movement and Conversion Instructions": "cp.async", "cp.async.commit_group",
 *     "cp.async.wait_group / cp.async.wait_all": copies that complete asynchronously;
 *     wait_group N waits until at most the N most recent committed groups of the executing
 *     thread are pending (copies not yet committed are not waited for).
 * tests/kernels/test_tensor_core_emulated.py checks every (lane, register) of these tables
 * against the PTX formulas and, independently, against CUTLASS's layouts for the same
 * instructions (cute/atom/mma_traits_sm80.hpp, cute/atom/copy_traits_sm75.hpp).
 *
 * How they are emulated:
 * - mma and ldmatrix are warp collectives (gl_emu::gather): all 32 lanes must arrive at the same
 *   instruction, or the launch fails (a lane that exited is named, as for the shuffles).
 * - mma: products of bf16/fp16 values are exact in float32; they are summed in float32 in k
 *   order onto C (fmaf); in the GPU numerics flavour (-DGL_EMU_GPU_NUMERICS) pairwise, then
 *   added to C. PTX does not specify the order or internal precision of the sum, so results
 *   may differ from a GPU's in the last bits: kernels are checked with tolerances.
 * - cp.async: the destination is poisoned (all bytes 0xff: NaN as float32, bfloat16 and float16)
 *   when the copy is issued and written only at the wait_group that completes its group, so a
 *   missing wait reads NaN; the source is read when the copy is issued. Only the 16-byte .cg
 *   form (with src-size for zero fill) is modelled. Pending copies belong to one thread of one
 *   block; a block that exits with copies pending loses them (they are dropped when the same
 *   resident thread next issues or waits in another block).
 * - Racecheck (-DGL_EMU_RACECHECK): the shared-memory operands may be watched pointers
 *   (GL_SMEM_PTR); ldmatrix records a read of each 16-byte row by the lane that names it,
 *   cp.async a write of its destination at the issue and at the completing wait.
 * - bfloat16 / float16 conversions from float round to nearest even (subnormals, overflow to
 *   inf, NaN kept NaN), as __float2bfloat16_rn / __float2half_rn.
 */
#ifndef GPTLAB_CUDA_EMU_TC_H
#define GPTLAB_CUDA_EMU_TC_H

#ifdef __CUDACC__
#error "cuda_emu_tc.h is the emulator's: under nvcc use cuda_bf16.h / cuda_fp16.h"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cuda_emu.h"

/* ------------------------------------------------------------------ bfloat16 and float16 */
struct __nv_bfloat16 {
    uint16_t bits;
};
struct __half {
    uint16_t bits;
};

inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(uint16_t u) { return {u}; }
inline uint16_t __half_as_ushort(__half h) { return h.bits; }
inline __half __ushort_as_half(uint16_t u) { return {u}; }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return {uint16_t((x >> 16) | 0x0040u)}; /* quiet NaN */
    x += 0x7fffu + ((x >> 16) & 1u); /* round to nearest, ties to even; overflow gives inf */
    return {uint16_t(x >> 16)};
}

inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t x = uint32_t(h.bits) << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

inline __half __float2half_rn(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) /* inf, NaN */
        return {uint16_t(sign | (x > 0x7f800000u ? 0x7e00u | ((x >> 13) & 0x3ffu) : 0x7c00u))};
    if (x < 0x38800000u) { /* below 2^-14: a float16 subnormal (or zero), in units of 2^-24 */
        float a;
        std::memcpy(&a, &x, 4);
        return {uint16_t(sign | uint16_t(std::nearbyint(a * 16777216.0f)))}; /* exact scaling */
    }
    /* normal: rebias the exponent (127 -> 15), round the 13 dropped bits to nearest even; a
     * carry into the exponent is right, and past 65504 it gives inf (0x7c00) */
    x += 0xc8000fffu + ((x >> 13) & 1u);
    return {uint16_t(sign | (x >= 0x0f800000u ? 0x7c00u : x >> 13))};
}

inline float __half2float(__half h) {
    const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, e = (h.bits >> 10) & 0x1fu,
                   m = h.bits & 0x3ffu;
    uint32_t x;
    if (e == 0x1f) x = sign | 0x7f800000u | (m << 13);
    else if (e != 0) x = sign | ((e + 112) << 23) | (m << 13);
    else { /* zero or subnormal: m * 2^-24, exact in float */
        float f = float(m) * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

namespace gl_emu {

/* ------------------------------------------------------------------ fragment layouts */
namespace frag {
constexpr int group(int lane) { return lane >> 2; }      /* PTX groupID */
constexpr int in_group(int lane) { return lane & 3; }    /* PTX threadID_in_group */
/* mma.m16n8k16, A (16 x 16): element i = 0..7 (register i / 2, half i % 2) */
constexpr int a_row(int lane, int i) { return group(lane) + 8 * ((i >> 1) & 1); }
constexpr int a_col(int lane, int i) { return 2 * in_group(lane) + (i & 1) + 8 * (i >> 2); }
/* B (16 x 8, k x n): element i = 0..3 */
constexpr int b_row(int lane, int i) { return 2 * in_group(lane) + (i & 1) + 8 * (i >> 1); }
constexpr int b_col(int lane, int) { return group(lane); }
/* C and D (16 x 8): element i = 0..3 (a float each) */
constexpr int c_row(int lane, int i) { return group(lane) + 8 * (i >> 1); }
constexpr int c_col(int lane, int i) { return 2 * in_group(lane) + (i & 1); }
/* ldmatrix: half h of a lane's register for one 8x8 matrix (row, col of the matrix in memory) */
constexpr int ld_row(int lane, int h, bool trans) { return trans ? 2 * in_group(lane) + h : group(lane); }
constexpr int ld_col(int lane, int h, bool trans) { return trans ? group(lane) : 2 * in_group(lane) + h; }
} /* namespace frag */

template <class T>
inline float tc_to_float(uint16_t bits);
template <>
inline float tc_to_float<__nv_bfloat16>(uint16_t bits) { return __bfloat162float({bits}); }
template <>
inline float tc_to_float<__half>(uint16_t bits) { return __half2float({bits}); }

inline uint16_t half_of(uint32_t reg, int h) { return uint16_t(h ? reg >> 16 : reg & 0xffffu); }

/* ------------------------------------------------------------------ mma.sync m16n8k16 */
/* acc (this lane's 4 floats of C) += A B, T = __nv_bfloat16 or __half: a warp collective. */
template <class T>
void mma_m16n8k16(const char *file, int line, float (&acc)[4], const uint32_t (&a)[4],
                  const uint32_t (&b)[2]) {
    struct Regs {
        uint32_t a[4], b[2];
    } mine, all[32];
    std::memcpy(mine.a, a, sizeof mine.a);
    std::memcpy(mine.b, b, sizeof mine.b);
    gather(file, line, 0xffffffffu, &mine, sizeof mine, all);
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; l++) {
        for (int i = 0; i < 8; i++)
            A[frag::a_row(l, i)][frag::a_col(l, i)] = tc_to_float<T>(half_of(all[l].a[i / 2], i & 1));
        for (int i = 0; i < 4; i++)
            B[frag::b_row(l, i)][frag::b_col(l, i)] = tc_to_float<T>(half_of(all[l].b[i / 2], i & 1));
    }
    const int lane = lane_id();
    for (int i = 0; i < 4; i++) {
        const int r = frag::c_row(lane, i), c = frag::c_col(lane, i);
#ifdef GL_EMU_GPU_NUMERICS
        /* another order, as a GPU's may be: the exact products summed pairwise, C added last */
        float sum[16];
        for (int kk = 0; kk < 16; kk++) sum[kk] = A[r][kk] * B[kk][c];
        for (int n = 8; n > 0; n /= 2)
            for (int kk = 0; kk < n; kk++) sum[kk] = sum[2 * kk] + sum[2 * kk + 1];
        acc[i] = acc[i] + sum[0];
#else
        float d = acc[i];
        for (int kk = 0; kk < 16; kk++) d = std::fma(A[r][kk], B[kk][c], d);
        acc[i] = d;
#endif
    }
}

/* ------------------------------------------------------------------ shared-memory operands */
/* The tc primitives take a raw pointer or, under racecheck, a watched one (GL_SMEM_PTR): they
 * read and write through the raw address and record the access themselves (race_access). */
inline void *raw(const void *p) { return const_cast<void *>(p); }
#ifdef GL_EMU_RACECHECK
template <class T>
void *raw(watched_ptr<T> p) {
    return const_cast<void *>(static_cast<const void *>(p.get()));
}
#endif

/* Within the dynamic shared memory the launch asked for (not merely the 48 KiB the emulator
 * keeps: past the launch's bytes a GPU holds another block's memory). */
inline bool in_dynamic_smem(const void *p, size_t bytes) {
    const char *base = static_cast<const char *>(dynamic_smem()), *c = static_cast<const char *>(p);
    return c >= base && c + bytes <= base + dynamic_smem_bytes();
}

/* ------------------------------------------------------------------ ldmatrix */
/* regs[j] = this lane's piece of matrix j (j < num: 1, 2 or 4); row_addr: this lane's row.
 * Each lane that gives a row (lanes 0 .. 8 num - 1) reads its 16 bytes when it arrives, and the
 * warp exchanges them: so the data is what the lanes saw at the instruction, whatever the
 * lanes do after it, and racecheck records each row as read by the lane that named it. */
inline void ldmatrix(const char *file, int line, int num, bool trans, uint32_t *regs,
                     const void *row_addr) {
    const int lane = lane_id();
    unsigned char mine[16] = {}, rows[32][16];
    if (lane < 8 * num) {
        const uintptr_t p = reinterpret_cast<uintptr_t>(row_addr);
        if (p % 16 != 0 || !in_dynamic_smem(row_addr, 16))
            launch_error(file, line, p % 16 ? "ldmatrix: a row address is not 16-byte aligned"
                                            : "ldmatrix: a row address is not in the shared "
                                              "memory the launch asked for");
#ifdef GL_EMU_RACECHECK
        race_access(row_addr, 16, Access::Read, file, line);
#endif
        std::memcpy(mine, row_addr, 16);
    }
    gather(file, line, 0xffffffffu, mine, sizeof mine, rows);
    for (int j = 0; j < num; j++) {
        uint32_t reg = 0;
        for (int h = 0; h < 2; h++) {
            uint16_t v;
            const unsigned char *row = rows[8 * j + frag::ld_row(lane, h, trans)];
            std::memcpy(&v, row + 2 * frag::ld_col(lane, h, trans), 2);
            reg |= uint32_t(v) << (16 * h);
        }
        regs[j] = reg;
    }
}

/* ------------------------------------------------------------------ cp.async */
struct CpAsyncCopy {
    void *dst;
    unsigned char bytes[16];
    int line; /* of the cp.async, for racecheck's record of the completing write */
    const char *file;
};
struct CpAsyncThread {
    uint64_t residency = 0;                       /* the block stay the pending copies belong to */
    std::vector<CpAsyncCopy> open;                /* issued, not yet committed */
    std::vector<std::vector<CpAsyncCopy>> groups; /* committed, oldest first */
};
/* Per thread in flight (blocks interleave under most schedules, each with its own shared
 * memory, so the state is per resident thread, not per threadIdx). */
inline CpAsyncThread cp_async_threads[MAX_RESIDENT_THREADS];

inline CpAsyncThread &cp_async_me() {
    CpAsyncThread &me = cp_async_threads[resident_thread()];
    if (me.residency != residency()) { /* an earlier block's leftovers: its shared memory is gone */
        me.open.clear();
        me.groups.clear();
        me.residency = residency();
    }
    return me;
}

/* cp.async.cg.shared.global [dst], [src], 16, src_bytes: the first src_bytes (0..16) bytes come
 * from src, the rest are zero. The destination reads NaN (0xff bytes) until the wait. Racecheck
 * records a write of dst at the issue (whoever still reads the old contents races with it) and
 * again at the wait that completes it (whoever reads the new contents must be ordered after
 * that wait, by a barrier). */
inline void cp_async16(const char *file, int line, void *dst, const void *src, int src_bytes) {
    if (reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(src) % 16 ||
        !in_dynamic_smem(dst, 16) || src_bytes < 0 || src_bytes > 16)
        launch_error(file, line, "cp.async needs a 16-byte aligned destination in the shared "
                     "memory the launch asked for, a 16-byte aligned global source, and 0 <= "
                     "src-size <= 16");
#ifdef GL_EMU_RACECHECK
    race_access(dst, 16, Access::Write, file, line);
#endif
    CpAsyncCopy c{dst, {}, line, file};
    if (src_bytes) std::memcpy(c.bytes, src, size_t(src_bytes));
    std::memset(dst, 0xff, 16);
    cp_async_me().open.push_back(c);
}

inline void cp_async_commit() {
    CpAsyncThread &me = cp_async_me();
    me.groups.push_back(std::move(me.open));
    me.open.clear();
}

inline void cp_async_wait(int pending) {
    CpAsyncThread &me = cp_async_me();
    while (int(me.groups.size()) > pending) {
        for (const CpAsyncCopy &c : me.groups.front()) {
#ifdef GL_EMU_RACECHECK
            race_access(c.dst, 16, Access::Write, c.file, c.line);
#endif
            std::memcpy(c.dst, c.bytes, 16);
        }
        me.groups.erase(me.groups.begin());
    }
}

} /* namespace gl_emu */

#endif /* GPTLAB_CUDA_EMU_TC_H */
