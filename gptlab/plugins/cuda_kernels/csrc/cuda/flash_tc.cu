/* Flash attention on tensor cores, forward and backward: bfloat16 / float16 in and out, float32
 * accumulation and logsumexp (FlashAttention-2: Dao 2023). The float32 kernels of flash.cu stay
 * the reference path. The backward is described above its kernels, below.
 *
 * Forward: one block of 4 warps per (batch·head, 64-query tile); warp w owns query rows 16w..16w+15 of
 * the tile (an m16 of mma.m16n8k16), so no shared memory is needed for the softmax.
 *   prologue: Q (64, D) and the first K, V tiles (BC, D) go to shared memory by cp.async; each
 *             warp then keeps its Q rows as mma A fragments in registers (ldmatrix.x4);
 *   per key tile j (causal: only tiles at or before the tile's last visible key):
 *     cp.async of tile j+1 into the other stage (K and V double-buffered), then
 *     S = Q K_jᵀ            (16, BC) per warp: mma with B = K rows (ldmatrix.x4, no .trans)
 *     scale·log2 e, mask (only on tiles that cross tk or the diagonal), row max over the lane's
 *     values and the 4 lanes of its row group (__shfl_xor 1, 2), P = exp2(S − m), α = exp2(m_old − m)
 *     O = α·O + P V_j       P's C fragments, rounded to T in pairs, are the A fragments of
 *                           this mma (no shared memory); B = V by ldmatrix.x4.trans
 *     cp.async.wait_group 0 and a barrier: tile j+1 landed, and nobody reads stage j & 1 again
 *   epilogue: the row sums l (kept per lane, reduced over the 4 lanes once), O / l rounded to T,
 *             L = (m + log2 l)·ln 2 (natural; +inf and O = 0 for a row that sees no key).
 * Fragment layouts (lane -> (row, col)): gptlab/verify/emu/cuda_emu_tc.h; for a lane, groupID =
 * lane / 4 holds rows groupID and groupID + 8 of its warp's 16, columns 2·(lane % 4) + {0, 1} of
 * each 8-wide n-tile.
 * Shared memory: two stages of K and V tiles, rows padded by 8 halves (16 bytes), so that rows
 * start 16 bytes apart modulo 128 and ldmatrix's 8 row addresses fall in 8 different groups of 4
 * banks; Q is staged in stage 1 before the loop. D = 64: BC = 64 keys, 36 KB; D = 128: BC = 32,
 * 34 KB (under the 48 KB a launch gets without opting in).
 * Query tiles are launched longest first (blockIdx.x runs over heads fastest, then tiles from
 * the last): with a causal mask the last tiles see the most keys.
 * Masks as in flash.cu: bottom-right causal (query r sees key c iff c <= r + tk − tq).
 * Layouts: q, k, v, o strided as in gptlab_kernels.h (batch, head, row strides, in elements);
 * every pointer 16-byte aligned and every stride a multiple of 8 elements (cp.async moves
 * 16 bytes); checked in the entry points.
 *
 * Reference: gptlab.testing.reference_attention (float64); conformance by FlashAttention's rule
 * in tests/kernels/test_flash_tc_emulated.py (error <= 2x that of torch in the same dtype).
 * Check:     pytest tests/kernels/test_flash_tc_emulated.py (the emulator, on the CPU)
 * Benchmark: gpt bench attention --device cuda --dtype bfloat16 --backends flash-tc (vs sdpa in
 *            the same dtype), and gpt kernels gpucheck; never run on a GPU yet, hence its
 *            priority below sdpa.
 */
#include <algorithm>
#include <initializer_list>

#include "attention.cuh"
#include "common.cuh"
#include "tensor_core.cuh"

namespace {

using gl::Layout;
using gl::layout_at;
using gl::slice_offset;
using gl::visible;

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * gl::WARP;
constexpr int BR = 16 * WARPS; /* queries per block: 16 per warp */
constexpr int PAD = 8;         /* halves of padding per shared-memory row */
constexpr double LN2_D = 0.6931471805599453094;

/* Keys per tile: 64 at D = 64, 32 at D = 128, so two stages of K and V fit in 48 KB. */
template <int D>
struct Tiles {
    static constexpr int BC = D >= 128 ? 32 : 64;
    static constexpr int STRIDE = D + PAD; /* halves per shared row */
    static constexpr int STAGE = 2 * BC * STRIDE; /* halves: K then V */
    static_assert(D % 16 == 0 && BC % 16 == 0 && BR <= 2 * BC, "Q is staged in one stage");
};

template <int D>
constexpr size_t smem_bytes() {
    return size_t(2) * Tiles<D>::STAGE * 2;
}

/* Rows [row0, row0 + rows) of an (n, D) matrix (row stride st) into shared memory (row stride
 * D + PAD) by cp.async, 16 bytes per copy; rows >= n are zero-filled. All threads take part. */
template <class T, int D>
__device__ __forceinline__ void load_rows(GL_SMEM_PTR(T) dst, const T *src, int64_t st, int row0, int rows,
                                          int n) {
    constexpr int CHUNKS = D / 8; /* 16-byte chunks per row */
    for (int i = threadIdx.x; i < rows * CHUNKS; i += THREADS) {
        const int r = i / CHUNKS, c = i - r * CHUNKS;
        const bool in = row0 + r < n;
        const T *g = src + (in ? int64_t(row0 + r) * st : 0) + c * 8; /* a valid address */
        gl::tc::cp_async16(dst + r * Tiles<D>::STRIDE + c * 8, g, in ? 16 : 0);
    }
}

template <class T, int D>
__global__ void __launch_bounds__(THREADS)
flash_tc_forward_kernel(T *__restrict__ o, float *__restrict__ lse, const T *__restrict__ q,
                        const T *__restrict__ k, const T *__restrict__ v, Layout lq, Layout lk,
                        Layout lv, Layout lo, int64_t nh, int64_t bh_count, int tq, int tk,
                        float scale_log2, int causal) {
    using Tl = Tiles<D>;
    constexpr int BC = Tl::BC, S = Tl::STRIDE;
    constexpr int KD = D / 16;  /* k-steps of S = Q Kᵀ */
    constexpr int NS = BC / 8;  /* n-tiles of S (8 keys each) */
    constexpr int KP = BC / 16; /* k-steps of P V */
    constexpr int NO = D / 8;   /* n-tiles of O (8 dims each) */
    GL_DYNAMIC_SMEM(T, smem);
    GL_SMEM_PTR(T) q_s = smem + Tl::STAGE; /* (BR, S): in stage 1 until the loop starts */
    const int lane = threadIdx.x % gl::WARP, warp = threadIdx.x / gl::WARP;
    const int tiles = (tq + BR - 1) / BR;
    const int64_t bh = blockIdx.x % bh_count;
    const int q0 = (tiles - 1 - int(blockIdx.x / bh_count)) * BR; /* longest first */
    q += slice_offset(lq, bh, nh);
    k += slice_offset(lk, bh, nh);
    v += slice_offset(lv, bh, nh);
    o += slice_offset(lo, bh, nh);
    lse += bh * tq;

    /* keys [0, k_end) can be visible to some query of this tile */
    const int q_last = gl::imin(q0 + BR, tq) - 1;
    const int k_end = causal ? gl::imax(0, gl::imin(tk, q_last + (tk - tq) + 1)) : tk;
    const int n_tiles = (k_end + BC - 1) / BC;

    load_rows<T, D>(q_s, q, lq.t, q0, BR, tq);
    if (n_tiles > 0) {
        load_rows<T, D>(smem, k, lk.t, 0, BC, tk);
        load_rows<T, D>(smem + BC * S, v, lv.t, 0, BC, tk);
    }
    gl::tc::cp_async_commit();
    gl::tc::cp_async_wait<0>();
    __syncthreads();
    /* this warp's 16 Q rows as A fragments: ldmatrix.x4, lane l gives row l % 16, col half l / 16 */
    uint32_t qf[KD][4];
#pragma unroll
    for (int kk = 0; kk < KD; kk++)
        gl::tc::ldmatrix_x4(qf[kk], q_s + (16 * warp + lane % 16) * S + kk * 16 + (lane / 16) * 8);
    __syncthreads(); /* stage 1 is free for K, V tile 1 */

    float acc[NO][4];  /* O (16, D): n-tile t, C fragment */
#pragma unroll
    for (int t = 0; t < NO; t++) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}; /* running max of rows g and g + 8 (base 2, scaled) */
    float l[2] = {0.f, 0.f};             /* this lane's part of the running row sums */
    const int row = q0 + 16 * warp + lane / 4; /* the lane's rows: row, row + 8 */

    for (int j = 0; j < n_tiles; j++) {
        const int k0 = j * BC;
        GL_SMEM_PTR(const T) k_s = smem + (j & 1) * Tl::STAGE;
        GL_SMEM_PTR(const T) v_s = k_s + BC * S;
        if (j + 1 < n_tiles) { /* prefetch tile j + 1 into the other stage */
            GL_SMEM_PTR(T) next = smem + ((j + 1) & 1) * Tl::STAGE;
            load_rows<T, D>(next, k, lk.t, k0 + BC, BC, tk);
            load_rows<T, D>(next + BC * S, v, lv.t, k0 + BC, BC, tk);
        }
        gl::tc::cp_async_commit();

        /* S = Q K_jᵀ: (16, BC); ldmatrix.x4 gives B fragments of two n-tiles (keys) */
        float s[NS][4];
#pragma unroll
        for (int t = 0; t < NS; t++) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KD; kk++) {
#pragma unroll
            for (int t = 0; t < NS; t += 2) {
                uint32_t kf[4]; /* (keys lo, k lo), (keys lo, k hi), (keys hi, k lo), (keys hi, k hi) */
                gl::tc::ldmatrix_x4(kf, k_s + (t * 8 + (lane / 16) * 8 + lane % 8) * S + kk * 16 +
                                            ((lane / 8) % 2) * 8);
                const uint32_t b0[2] = {kf[0], kf[1]}, b1[2] = {kf[2], kf[3]};
                gl::tc::mma<T>(s[t], qf[kk], b0);
                gl::tc::mma<T>(s[t + 1], qf[kk], b1);
            }
        }

        /* scale, mask, online softmax on the fragments: element i of n-tile t is
         * (row + 8·(i / 2), k0 + 8t + 2·(lane % 4) + i % 2) */
        const bool masked = k0 + BC > tk || (causal && k0 + BC - 1 > q0 + 16 * warp + (tk - tq));
        float mx[2] = {m[0], m[1]};
#pragma unroll
        for (int t = 0; t < NS; t++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float x = s[t][i] * scale_log2;
                if (masked && !visible(row + 8 * (i / 2), k0 + 8 * t + 2 * (lane % 4) + i % 2, tq,
                                       tk, causal))
                    x = -INFINITY;
                s[t][i] = x;
                mx[i / 2] = fmaxf(mx[i / 2], x);
            }
        }
        float alpha[2], shift[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(gl::FULL_MASK, mx[h], 1));
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(gl::FULL_MASK, mx[h], 2));
            shift[h] = mx[h] == -INFINITY ? 0.f : mx[h]; /* no -inf - -inf */
            alpha[h] = exp2f(m[h] - shift[h]);
            m[h] = mx[h];
            l[h] *= alpha[h];
        }
#pragma unroll
        for (int t = 0; t < NS; t++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                s[t][i] = exp2f(s[t][i] - shift[i / 2]); /* 0 where masked */
                l[i / 2] += s[t][i];
            }
        }
#pragma unroll
        for (int t = 0; t < NO; t++) {
            acc[t][0] *= alpha[0];
            acc[t][1] *= alpha[0];
            acc[t][2] *= alpha[1];
            acc[t][3] *= alpha[1];
        }

        /* O += P V_j: the C fragments of n-tiles 2kk, 2kk + 1 of P are the A fragment of
         * k-step kk; ldmatrix.x4.trans gives B fragments of two n-tiles (dims) of V */
#pragma unroll
        for (int kk = 0; kk < KP; kk++) {
            const uint32_t pa[4] = {
                gl::tc::pack<T>(s[2 * kk][0], s[2 * kk][1]),
                gl::tc::pack<T>(s[2 * kk][2], s[2 * kk][3]),
                gl::tc::pack<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                gl::tc::pack<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int t = 0; t < NO; t += 2) {
                uint32_t vf[4]; /* (keys lo, dims lo), (keys hi, dims lo), (keys lo, dims hi), ... */
                gl::tc::ldmatrix_x4_trans(vf, v_s + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * S +
                                                  t * 8 + (lane / 16) * 8);
                const uint32_t b0[2] = {vf[0], vf[1]}, b1[2] = {vf[2], vf[3]};
                gl::tc::mma<T>(acc[t], pa, b0);
                gl::tc::mma<T>(acc[t + 1], pa, b1);
            }
        }
#ifndef GL_PLANT_MISSING_CP_ASYNC_WAIT /* tests/kernels/test_flash_tc_emulated.py plants this bug */
        gl::tc::cp_async_wait<0>();
#endif
        __syncthreads(); /* tile j + 1 is in; nobody reads this stage again before it is refilled */
    }

    /* the 4 lanes of a row group hold parts of the row sums */
#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(gl::FULL_MASK, l[h], 1);
        l[h] += __shfl_xor_sync(gl::FULL_MASK, l[h], 2);
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int r = row + 8 * h;
        if (r >= tq) continue;
        const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
        T *orow = o + int64_t(r) * lo.t + 2 * (lane % 4);
#pragma unroll
        for (int t = 0; t < NO; t++)
            *reinterpret_cast<uint32_t *>(orow + 8 * t) =
                gl::tc::pack<T>(acc[t][2 * h] * inv, acc[t][2 * h + 1] * inv);
        if (lane % 4 == 0)
            lse[r] = l[h] > 0.f ? float((double(m[h]) + double(log2f(l[h]))) * LN2_D) : INFINITY;
    }
}

/* ------------------------------------------------------------------------ backward */
/* Backward (recompute P from the logsumexp; no T x T buffer), three launches:
 *   1. prep: Dvec = rowsum(dO ⊙ O) in float32 (a warp per row) and the dQ accumulator zeroed;
 *   2. one block of 4 warps per (batch·head, 64-key tile), the first key tiles (causal: the
 *      longest) launched first; warp w owns keys 16w..16w+15, whose
 *      dK and dV (16, D) stay in registers as C fragments. K and V tiles are loaded once by
 *      cp.async; then for each 16-query tile that can see them (Q and dO by cp.async, L and
 *      Dvec beside them):
 *        Sᵀ = K Qᵀ, dPᵀ = V dOᵀ        (16 keys, 16 queries) per warp, A = K or V rows, B = Q
 *                                      or dO rows (ldmatrix, no .trans)
 *        Pᵀ = exp2(Sᵀ·scale·log2 e − L·log2 e) (0 where masked), dSᵀ = Pᵀ ⊙ (dPᵀ − Dvec)
 *        dV += Pᵀ dO, dK += dSᵀ Q      Pᵀ and dSᵀ from the C fragments straight into A
 *                                      fragments; B = dO, Q by ldmatrix.trans
 *        dSᵀ (rounded to T) to shared memory; then dQ (16, D) += dS K with warp w on dims
 *        [wD/4, (w+1)D/4): A = dS by ldmatrix.trans of dSᵀ, B = K by ldmatrix.trans, added
 *        into the float32 accumulator with atomicAdd (so on a GPU the order of the additions,
 *        hence the last bits of dQ, vary between runs: not deterministic);
 *      dK = scale · dK and dV rounded to T and stored;
 *   3. dq = scale · accumulator, rounded to T.
 * Shared memory at D = 128: K, V (64, 136) + Q, dO (16, 136) + dSᵀ (64, 24) halves + 32 floats
 * = 46.6 KB; at D = 64, 26.5 KB. Q and dO are single-buffered (a second stage does not fit at
 * D = 128 under 48 KB). */
constexpr int KB = 64; /* keys per backward block: 16 per warp */
constexpr int QB = 16; /* queries per backward tile */
constexpr int DS_STRIDE = QB + PAD;

template <int D>
constexpr size_t bwd_smem_bytes() {
    return size_t(2 * KB * (D + PAD) + 2 * QB * (D + PAD) + KB * DS_STRIDE) * 2 + 2 * QB * 4;
}

template <class T>
__global__ void __launch_bounds__(THREADS)
flash_tc_backward_prep_kernel(float *__restrict__ dq_acc, float *__restrict__ dvec,
                              const T *__restrict__ o, const T *__restrict__ dout, Layout lo,
                              Layout ldo, int64_t nh, int64_t rows, int tq, int d) {
    const int64_t row = int64_t(blockIdx.x) * WARPS + threadIdx.x / gl::WARP;
    const int lane = threadIdx.x % gl::WARP;
    if (row >= rows) return; /* the whole warp leaves: no block-wide barrier follows */
    const int64_t bh = row / tq, i = row - bh * tq;
    const T *orow = o + slice_offset(lo, bh, nh) + i * lo.t;
    const T *dorow = dout + slice_offset(ldo, bh, nh) + i * ldo.t;
    float dot = 0.f;
    for (int j = lane; j < d; j += gl::WARP) {
        dot += gl::tc::to_float(dorow[j]) * gl::tc::to_float(orow[j]);
        dq_acc[row * d + j] = 0.f;
    }
    dot = gl::warp_sum(dot);
    if (lane == 0) dvec[row] = dot;
}

template <class T, int D>
__global__ void __launch_bounds__(THREADS)
flash_tc_backward_kernel(T *__restrict__ dk, T *__restrict__ dv, float *dq_acc,
                         const float *__restrict__ dvec, const T *__restrict__ q,
                         const T *__restrict__ k, const T *__restrict__ v,
                         const float *__restrict__ lse, const T *__restrict__ dout, Layout lq,
                         Layout lk, Layout lv, Layout ldo, Layout ldk, Layout ldv, int64_t nh,
                         int64_t bh_count, int tq, int tk, float scale, int causal) {
    constexpr int S = D + PAD;
    constexpr int KD = D / 16;     /* k-steps of Sᵀ and dPᵀ (over the head dim) */
    constexpr int NO = D / 8;      /* n-tiles of dK, dV */
    constexpr int DW = D / WARPS;  /* dims of dQ per warp */
    constexpr int NQ = DW / 8;     /* n-tiles of dQ per warp */
    static_assert(NQ % 2 == 0, "ldmatrix.x4 gives two n-tiles");
    GL_DYNAMIC_SMEM(T, smem);
    GL_SMEM_PTR(T) k_s = smem;           /* (KB, S) */
    GL_SMEM_PTR(T) v_s = k_s + KB * S;   /* (KB, S) */
    GL_SMEM_PTR(T) q_s = v_s + KB * S;   /* (QB, S) */
    GL_SMEM_PTR(T) do_s = q_s + QB * S;  /* (QB, S) */
    GL_SMEM_PTR(T) ds_s = do_s + QB * S; /* (KB, DS_STRIDE): dSᵀ, keys x queries */
    GL_SMEM_PTR(float) l_s = GL_SMEM_CAST(float, ds_s + KB * DS_STRIDE); /* (QB): L·log2 e */
    GL_SMEM_PTR(float) d_s = l_s + QB;                                   /* (QB): Dvec */
    const int lane = threadIdx.x % gl::WARP, warp = threadIdx.x / gl::WARP;
    const int64_t bh = blockIdx.x % bh_count;
    const int k0 = int(blockIdx.x / bh_count) * KB; /* causal: the first key tiles, seen by the
                                                     * most queries, are launched first */
    const float scale_log2 = scale * gl::LOG2E;
    q += slice_offset(lq, bh, nh);
    dout += slice_offset(ldo, bh, nh);
    k += slice_offset(lk, bh, nh);
    v += slice_offset(lv, bh, nh);
    dk += slice_offset(ldk, bh, nh);
    dv += slice_offset(ldv, bh, nh);
    dq_acc += bh * tq * D;
    lse += bh * tq;
    dvec += bh * tq;

    load_rows<T, D>(k_s, k, lk.t, k0, KB, tk);
    load_rows<T, D>(v_s, v, lv.t, k0, KB, tk);
    gl::tc::cp_async_commit();

    float dk_acc[NO][4], dv_acc[NO][4]; /* rows: this warp's 16 keys; cols: head dims */
#pragma unroll
    for (int t = 0; t < NO; t++)
#pragma unroll
        for (int i = 0; i < 4; i++) dk_acc[t][i] = dv_acc[t][i] = 0.f;
    const int key = k0 + 16 * warp + lane / 4; /* the lane's keys: key, key + 8 */

    /* the first query that sees key k0 (causal): r + (tk - tq) >= k0 */
    const int r_begin = causal ? gl::imax(0, k0 - (tk - tq)) / QB * QB : 0;
    for (int r0 = r_begin; r0 < tq; r0 += QB) {
        __syncthreads(); /* nobody still reads the previous query tile or dSᵀ */
        load_rows<T, D>(q_s, q, lq.t, r0, QB, tq);
        load_rows<T, D>(do_s, dout, ldo.t, r0, QB, tq);
        gl::tc::cp_async_commit();
        if (threadIdx.x < QB) {
            const int r = r0 + threadIdx.x;
            l_s[threadIdx.x] = r < tq ? lse[r] * gl::LOG2E : INFINITY;
            d_s[threadIdx.x] = r < tq ? dvec[r] : 0.f;
        }
        gl::tc::cp_async_wait<0>();
        __syncthreads();

        /* Sᵀ = K Qᵀ and dPᵀ = V dOᵀ: (16 keys, 16 queries), two n-tiles of 8 queries */
        float s[2][4] = {}, dp[2][4] = {};
#pragma unroll
        for (int kk = 0; kk < KD; kk++) {
            uint32_t ka[4], va[4], qb[4], dob[4];
            const int a_off = (16 * warp + lane % 16) * S + kk * 16 + (lane / 16) * 8;
            const int b_off = ((lane / 16) * 8 + lane % 8) * S + kk * 16 + ((lane / 8) % 2) * 8;
            gl::tc::ldmatrix_x4(ka, k_s + a_off);
            gl::tc::ldmatrix_x4(va, v_s + a_off);
            gl::tc::ldmatrix_x4(qb, q_s + b_off);
            gl::tc::ldmatrix_x4(dob, do_s + b_off);
            const uint32_t q0b[2] = {qb[0], qb[1]}, q1b[2] = {qb[2], qb[3]};
            const uint32_t d0b[2] = {dob[0], dob[1]}, d1b[2] = {dob[2], dob[3]};
            gl::tc::mma<T>(s[0], ka, q0b);
            gl::tc::mma<T>(s[1], ka, q1b);
            gl::tc::mma<T>(dp[0], va, d0b);
            gl::tc::mma<T>(dp[1], va, d1b);
        }
        /* element i of n-tile t: key + 8·(i / 2), query r0 + 8t + 2·(lane % 4) + i % 2 */
        const bool masked = r0 + QB > tq || k0 + 16 * warp + 16 > tk ||
                            (causal && k0 + 16 * warp + 15 > r0 + (tk - tq));
#pragma unroll
        for (int t = 0; t < 2; t++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int ql = 8 * t + 2 * (lane % 4) + i % 2;
                float p = exp2f(s[t][i] * scale_log2 - l_s[ql]);
                if (masked && !visible(r0 + ql, key + 8 * (i / 2), tq, tk, causal))
                    p = 0.f;
                s[t][i] = p;                         /* Pᵀ */
                dp[t][i] = p * (dp[t][i] - d_s[ql]); /* dSᵀ */
            }
        }
        /* dV += Pᵀ dO and dK += dSᵀ Q: k = the 16 queries; B by ldmatrix.x4.trans */
        const uint32_t pa[4] = {gl::tc::pack<T>(s[0][0], s[0][1]), gl::tc::pack<T>(s[0][2], s[0][3]),
                                gl::tc::pack<T>(s[1][0], s[1][1]), gl::tc::pack<T>(s[1][2], s[1][3])};
        const uint32_t dsa[4] = {
            gl::tc::pack<T>(dp[0][0], dp[0][1]), gl::tc::pack<T>(dp[0][2], dp[0][3]),
            gl::tc::pack<T>(dp[1][0], dp[1][1]), gl::tc::pack<T>(dp[1][2], dp[1][3])};
#pragma unroll
        for (int t = 0; t < NO; t += 2) {
            uint32_t dob[4], qb[4];
            const int off = (((lane / 8) % 2) * 8 + lane % 8) * S + t * 8 + (lane / 16) * 8;
            gl::tc::ldmatrix_x4_trans(dob, do_s + off);
            gl::tc::ldmatrix_x4_trans(qb, q_s + off);
            const uint32_t d0b[2] = {dob[0], dob[1]}, d1b[2] = {dob[2], dob[3]};
            const uint32_t q0b[2] = {qb[0], qb[1]}, q1b[2] = {qb[2], qb[3]};
            gl::tc::mma<T>(dv_acc[t], pa, d0b);
            gl::tc::mma<T>(dv_acc[t + 1], pa, d1b);
            gl::tc::mma<T>(dk_acc[t], dsa, q0b);
            gl::tc::mma<T>(dk_acc[t + 1], dsa, q1b);
        }
        /* dSᵀ to shared memory (keys x queries), the A operand of dQ */
#pragma unroll
        for (int t = 0; t < 2; t++)
#pragma unroll
            for (int h = 0; h < 2; h++)
                GL_SMEM_CAST(uint32_t, ds_s + (16 * warp + lane / 4 + 8 * h) * DS_STRIDE +
                                           8 * t + 2 * (lane % 4))[0] = dsa[2 * t + h];
        __syncthreads();
        /* dQ (16 queries, dims [w·DW, (w+1)·DW)) += dS K over the block's 64 keys */
        float dq[NQ][4] = {};
#pragma unroll
        for (int kk = 0; kk < KB / 16; kk++) {
            uint32_t da[4]; /* A = dS (queries x keys) from dSᵀ by .trans: matrix j = l / 8 is
                             * (keys 8·(j / 2), queries 8·(j % 2)) */
            gl::tc::ldmatrix_x4_trans(da, ds_s + (kk * 16 + (lane / 16) * 8 + lane % 8) * DS_STRIDE +
                                              ((lane / 8) % 2) * 8);
#pragma unroll
            for (int t = 0; t < NQ; t += 2) {
                uint32_t kb[4];
                gl::tc::ldmatrix_x4_trans(kb, k_s + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * S +
                                                  warp * DW + t * 8 + (lane / 16) * 8);
                const uint32_t k0b[2] = {kb[0], kb[1]}, k1b[2] = {kb[2], kb[3]};
                gl::tc::mma<T>(dq[t], da, k0b);
                gl::tc::mma<T>(dq[t + 1], da, k1b);
            }
        }
#pragma unroll
        for (int t = 0; t < NQ; t++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int r = r0 + lane / 4 + 8 * (i / 2);
                if (r < tq)
                    atomicAdd(&dq_acc[int64_t(r) * D + warp * DW + 8 * t + 2 * (lane % 4) + i % 2],
                              dq[t][i]);
            }
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int c = key + 8 * h;
        if (c >= tk) continue;
        T *dkr = dk + int64_t(c) * ldk.t + 2 * (lane % 4), *dvr = dv + int64_t(c) * ldv.t + 2 * (lane % 4);
#pragma unroll
        for (int t = 0; t < NO; t++) {
            *reinterpret_cast<uint32_t *>(dkr + 8 * t) =
                gl::tc::pack<T>(scale * dk_acc[t][2 * h], scale * dk_acc[t][2 * h + 1]);
            *reinterpret_cast<uint32_t *>(dvr + 8 * t) =
                gl::tc::pack<T>(dv_acc[t][2 * h], dv_acc[t][2 * h + 1]);
        }
    }
}

template <class T>
__global__ void __launch_bounds__(THREADS)
flash_tc_backward_dq_kernel(T *__restrict__ dq, const float *__restrict__ dq_acc, Layout ldq,
                            int64_t nh, int64_t n, int tq, int d, float scale) {
    for (int64_t i = int64_t(blockIdx.x) * THREADS + threadIdx.x; i < n;
         i += int64_t(gridDim.x) * THREADS) {
        const int64_t row = i / d, bh = row / tq, r = row - bh * tq;
        dq[slice_offset(ldq, bh, nh) + r * ldq.t + (i - row * d)] =
            gl::tc::from_float<T>(scale * dq_acc[i]);
    }
}

int check(const char *fn, int64_t b, int64_t nh, int64_t tq, int64_t tk, int64_t d,
          float scale) {
    if (b < 1 || nh < 1 || tq < 1 || tk < 1)
        return gl::fail(GPTLAB_EINVAL, "%s: sizes must be >= 1 (b=%lld nh=%lld tq=%lld tk=%lld)",
                        fn, (long long)b, (long long)nh, (long long)tq, (long long)tk);
    if (d != 64 && d != 128)
        return gl::fail(GPTLAB_EINVAL, "%s: head dim %lld not supported (64 or 128)", fn,
                        (long long)d);
    if (tq > INT32_MAX / 2 || tk > INT32_MAX / 2)
        return gl::fail(GPTLAB_EINVAL, "%s: sequence length too large", fn);
    if (b * nh * gl::ceil_div(tq, BR) > INT32_MAX)
        return gl::fail(GPTLAB_EINVAL, "%s: b*nh*tq too large for one launch", fn);
    if (!(scale > 0.f) || !std::isfinite(scale))
        return gl::fail(GPTLAB_EINVAL, "%s: scale must be finite and > 0, got %g", fn, scale);
    return GPTLAB_OK;
}

/* cp.async moves 16 bytes: every operand 16-byte aligned, every stride of the n_tensors layouts
 * a multiple of 8 elements. */
int check_cp_async(const char *fn, std::initializer_list<const void *> operands,
                   const char *which, const int64_t *strides, int n_tensors) {
    for (const void *p : operands)
        if (reinterpret_cast<uintptr_t>(p) % 16)
            return gl::fail(GPTLAB_EINVAL, "%s: %s must be 16-byte aligned", fn, which);
    for (int i = 0; i < 3 * n_tensors; i++)
        if (strides[i] % 8)
            return gl::fail(GPTLAB_EINVAL, "%s: strides must be multiples of 8 elements, got "
                            "%lld", fn, (long long)strides[i]);
    return GPTLAB_OK;
}

template <class T>
int forward(const char *fn, void *o, float *lse, const void *q, const void *k, const void *v,
            const int64_t *strides, int64_t b, int64_t nh, int64_t tq, int64_t tk, int64_t d,
            float scale, int causal, void *stream) {
    gl::clear_error();
    if (!o || !lse || !q || !k || !v || !strides) return gl::fail(GPTLAB_EINVAL, "%s: null pointer", fn);
    if (int rc = check(fn, b, nh, tq, tk, d, scale)) return rc;
    if (int rc = check_cp_async(fn, {o, q, k, v}, "q, k, v, o", strides, 4)) return rc;
    const int64_t bh = b * nh;
    gl::DeviceGuard device;
    if (int rc = device.bind(o, fn)) return rc;
    const dim3 grid(unsigned(bh * gl::ceil_div(tq, BR))), block(THREADS);
    const Layout lq = layout_at(strides, 0), lk = layout_at(strides, 1), lv = layout_at(strides, 2),
                 lo = layout_at(strides, 3);
    T *o_ = static_cast<T *>(o);
    const T *q_ = static_cast<const T *>(q), *k_ = static_cast<const T *>(k),
            *v_ = static_cast<const T *>(v);
    if (d == 64)
        GL_LAUNCH((flash_tc_forward_kernel<T, 64>), grid, block, smem_bytes<64>(), stream, o_, lse,
                  q_, k_, v_, lq, lk, lv, lo, nh, bh, int(tq), int(tk), scale * gl::LOG2E, causal);
    else
        GL_LAUNCH((flash_tc_forward_kernel<T, 128>), grid, block, smem_bytes<128>(), stream, o_,
                  lse, q_, k_, v_, lq, lk, lv, lo, nh, bh, int(tq), int(tk), scale * gl::LOG2E,
                  causal);
    return gl::check_launch(fn);
}

template <class T>
int backward(const char *fn, void *dq, void *dk, void *dv, void *workspace, const void *q,
             const void *k, const void *v, const void *o, const float *lse, const void *dout,
             const int64_t *strides, int64_t b, int64_t nh, int64_t tq, int64_t tk, int64_t d,
             float scale, int causal, void *stream) {
    gl::clear_error();
    if (!dq || !dk || !dv || !workspace || !q || !k || !v || !o || !lse || !dout || !strides)
        return gl::fail(GPTLAB_EINVAL, "%s: null pointer", fn);
    if (int rc = check(fn, b, nh, tq, tk, d, scale)) return rc;
    if (b * nh * gl::ceil_div(tk, KB) > INT32_MAX || gl::ceil_div(b * nh * tq, WARPS) > INT32_MAX)
        return gl::fail(GPTLAB_EINVAL, "%s: b*nh*tk too large for one launch", fn);
    if (int rc = check_cp_async(fn, {dq, dk, dv, q, k, v, o, dout}, "tensors", strides, 8))
        return rc;
    const int64_t bh = b * nh, rows = bh * tq;
    /* strides: q, k, v, o, dout, dq, dk, dv */
    const Layout lq = layout_at(strides, 0), lk = layout_at(strides, 1), lv = layout_at(strides, 2),
                 lo = layout_at(strides, 3), ldo = layout_at(strides, 4),
                 ldq = layout_at(strides, 5), ldk = layout_at(strides, 6),
                 ldv = layout_at(strides, 7);
    gl::DeviceGuard device;
    if (int rc = device.bind(dq, fn)) return rc;
    float *dq_acc = static_cast<float *>(workspace), *dvec = dq_acc + rows * d;
    const T *q_ = static_cast<const T *>(q), *k_ = static_cast<const T *>(k),
            *v_ = static_cast<const T *>(v), *o_ = static_cast<const T *>(o),
            *do_ = static_cast<const T *>(dout);
    T *dk_ = static_cast<T *>(dk), *dv_ = static_cast<T *>(dv);
    GL_LAUNCH(flash_tc_backward_prep_kernel<T>, dim3(unsigned(gl::ceil_div(rows, WARPS))),
              dim3(THREADS), 0, stream, dq_acc, dvec, o_, do_, lo, ldo, nh, rows, int(tq), int(d));
    if (int rc = gl::check_launch(fn)) return rc;
    const dim3 grid(unsigned(bh * gl::ceil_div(tk, KB)));
    if (d == 64)
        GL_LAUNCH((flash_tc_backward_kernel<T, 64>), grid, dim3(THREADS), bwd_smem_bytes<64>(),
                  stream, dk_, dv_, dq_acc, dvec, q_, k_, v_, lse, do_, lq, lk, lv, ldo, ldk, ldv,
                  nh, bh, int(tq), int(tk), scale, causal);
    else
        GL_LAUNCH((flash_tc_backward_kernel<T, 128>), grid, dim3(THREADS), bwd_smem_bytes<128>(),
                  stream, dk_, dv_, dq_acc, dvec, q_, k_, v_, lse, do_, lq, lk, lv, ldo, ldk, ldv,
                  nh, bh, int(tq), int(tk), scale, causal);
    if (int rc = gl::check_launch(fn)) return rc;
    const int64_t n = rows * d;
    GL_LAUNCH(flash_tc_backward_dq_kernel<T>,
              dim3(unsigned(std::min<int64_t>(gl::ceil_div(n, THREADS), 65535))), dim3(THREADS),
              0, stream, static_cast<T *>(dq), dq_acc, ldq, nh, n, int(tq), int(d), scale);
    return gl::check_launch(fn);
}

} /* namespace */

extern "C" int gptlab_flash_forward_bf16(void *o, float *lse, const void *q, const void *k,
                                         const void *v, const int64_t *strides, int64_t b,
                                         int64_t nh, int64_t tq, int64_t tk, int64_t d,
                                         float scale, int causal, void *stream,
                                         int num_threads) {
    (void)num_threads;
    return forward<__nv_bfloat16>("flash_forward_bf16", o, lse, q, k, v, strides, b, nh, tq, tk,
                                  d, scale, causal, stream);
}

extern "C" int gptlab_flash_forward_f16(void *o, float *lse, const void *q, const void *k,
                                        const void *v, const int64_t *strides, int64_t b,
                                        int64_t nh, int64_t tq, int64_t tk, int64_t d,
                                        float scale, int causal, void *stream,
                                        int num_threads) {
    (void)num_threads;
    return forward<__half>("flash_forward_f16", o, lse, q, k, v, strides, b, nh, tq, tk, d, scale,
                           causal, stream);
}

extern "C" int gptlab_flash_backward_bf16(void *dq, void *dk, void *dv, void *workspace,
                                          const void *q, const void *k, const void *v,
                                          const void *o, const float *lse, const void *dout,
                                          const int64_t *strides, int64_t b, int64_t nh,
                                          int64_t tq, int64_t tk, int64_t d, float scale,
                                          int causal, void *stream, int num_threads) {
    (void)num_threads;
    return backward<__nv_bfloat16>("flash_backward_bf16", dq, dk, dv, workspace, q, k, v, o, lse,
                                   dout, strides, b, nh, tq, tk, d, scale, causal, stream);
}

extern "C" int gptlab_flash_backward_f16(void *dq, void *dk, void *dv, void *workspace,
                                         const void *q, const void *k, const void *v,
                                         const void *o, const float *lse, const void *dout,
                                         const int64_t *strides, int64_t b, int64_t nh,
                                         int64_t tq, int64_t tk, int64_t d, float scale,
                                         int causal, void *stream, int num_threads) {
    (void)num_threads;
    return backward<__half>("flash_backward_f16", dq, dk, dv, workspace, q, k, v, o, lse, dout,
                            strides, b, nh, tq, tk, d, scale, causal, stream);
}
