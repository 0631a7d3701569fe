/* Flash attention forward and backward in CUDA, float32 (FlashAttention-2 order: Dao 2023;
 * Dao et al. 2022; online softmax: Milakov & Gimelshein 2018).
 *
 * Forward, one block per (batch·head, 16-query tile), 4 warps of 32 lanes:
 *   the query tile is staged in shared memory; for each 32-key tile that the tile's queries can
 *   see (causal tiles past the diagonal are skipped), K and V are staged in shared memory, then
 *   each warp takes 4 query rows in turn: lane c computes the score against key c, warp_max and
 *   warp_sum give the running max m and sum l (base 2, scale·log2 e folded in, the shift guarded
 *   so that -inf - -inf never occurs), the row's 32 probabilities go through shared memory, and
 *   each lane updates its ceil(d/32) output dims held in registers. O = acc / l and the natural
 *   logsumexp L = (m + log2 l)·ln 2 are written; a row with no visible key gets O = 0, L = +inf.
 * Backward (recompute P from L; no T x T buffer):
 *   1. prep: D = rowsum(dO ⊙ O) per query row (a warp per row) and the dQ accumulator zeroed;
 *   2. one block per (batch·head, 32-key tile): K and V tiles stay in shared memory; for each
 *      8-query tile that can see them: P = exp2(S·log2 e − L·log2 e), dP = dO Vᵀ, dS = P ⊙ (dP − D)
 *      into shared memory; each warp accumulates dV += Pᵀ dO and dK += dSᵀ Q for its 8 keys in
 *      registers over a block of 64 queries, then adds the block's sums into dk, dv (two-level
 *      sums: one float32 sum over all tq queries lost precision at long causal sequences), and
 *      adds dS K for its query rows into the float32 dQ workspace with atomicAdd (so on a GPU
 *      the summation order, hence the last bits of dQ, vary between runs);
 *   3. dq = scale · workspace.
 * Precision as in the CPU twin (FlashAttention's rule, tests/kernels/test_conformance.py): dot
 * products over the head dim in blocks of 16 terms, dK and dV in blocks of 64 queries, L in
 * double, rounded once, and L·log2 e in the backward as a float pair.
 * Workspace (caller-allocated): bh·tq·d floats of dQ accumulator, then bh·tq floats of D.
 * Layouts: q, k, v, o, do, dq, dk, dv are strided (batch, head and row strides, the head dim
 * contiguous; see gptlab_kernels.h), as in the CPU twin: no copies around the call.
 * Grids are one-dimensional (block = batch·head · tiles + tile), so batch·head is not capped by
 * the 65535 limit of grid.y; consecutive blocks share a head's K and V in L2.
 *
 * Reference: gptlab.testing.reference_attention (float64 softmax attention, same mask).
 * Check:     gpt kernels check --flavour cuda-emu  (the emulator, on the CPU; pytest
 *            tests/kernels/test_cuda_emulated.py), gpt kernels check --flavour cuda (on a GPU)
 * Benchmark: gpt bench attention --device cuda --backends flash  (on a GPU, vs sdpa)
 * CPU twin:  ../cpu/flash.c
 */
#include <algorithm>

#include "attention.cuh"
#include "common.cuh"

namespace {

using gl::Layout;
using gl::layout_at;
using gl::slice_offset;
using gl::visible;

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * gl::WARP;
constexpr int FWD_ROWS = 16;                      /* queries per forward block */
constexpr int FWD_ROWS_PER_WARP = FWD_ROWS / WARPS;
constexpr int KEYS = 32;                          /* keys per tile: one per lane */
constexpr int BWD_ROWS = 8;                       /* queries per backward inner tile */
constexpr int BWD_ROWS_PER_WARP = BWD_ROWS / WARPS;
constexpr int BWD_KEYS_PER_WARP = KEYS / WARPS;
constexpr int QBLOCK = 64;                        /* backward: query rows per partial dK, dV sum */
constexpr int DOT_BLOCK = 16;                     /* terms per partial sum of a dot product */
constexpr double LOG2E_D = 1.4426950408889634074, LN2_D = 0.6931471805599453094;
static_assert(KEYS == gl::WARP, "one key per lane");
static_assert(QBLOCK % BWD_ROWS == 0, "a block of queries is whole query tiles");

/* Shared-memory layout in floats (at d = 128: 41.6 KB forward, 43.4 KB backward, under the
 * 48 KB a launch may take without opting in). Rows read by lane = key use an odd stride. */
__host__ __device__ __forceinline__ int64_t fwd_smem_floats(int d) {
    return int64_t(FWD_ROWS) * d + int64_t(KEYS) * gl::odd_stride(d) + int64_t(KEYS) * d +
           WARPS * KEYS;
}
__host__ __device__ __forceinline__ int64_t bwd_smem_floats(int d) {
    return 2 * int64_t(BWD_ROWS) * d + 2 * int64_t(KEYS) * gl::odd_stride(d) +
           2 * BWD_ROWS * (KEYS + 1) + 3 * BWD_ROWS;
}

/* sum_j a[j] * b[j] over j < d, in blocks of DOT_BLOCK terms each summed from zero and then
 * added. One running float32 sum over all d terms has a rounding error that grows with d; in the
 * backward that error in dP = dO·Vᵀ does not cancel against D = rowsum(dO ⊙ O) (computed apart),
 * and on rows with a peaked softmax it made dQ's error twice that of float32 softmax(QKᵀ) V in
 * torch. Blocking costs one add per DOT_BLOCK multiply-adds. */
__device__ __forceinline__ float blocked_dot(GL_SMEM_PTR(const float) a,
                                             GL_SMEM_PTR(const float) b, int d) {
    float sum = 0.f;
    for (int j0 = 0; j0 < d; j0 += DOT_BLOCK) {
        const int j1 = gl::imin(j0 + DOT_BLOCK, d);
        float part = 0.f;
        for (int j = j0; j < j1; j++) part += a[j] * b[j];
        sum += part;
    }
    return sum;
}

/* Copy rows [row0, row0 + rows) of an (n, d) matrix with row stride `st` into shared memory
 * with row stride `stride`, zero-filling rows >= n. All threads of the block take part. */
__device__ __forceinline__ void stage(GL_SMEM_PTR(float) dst, int stride, const float *src,
                                      int64_t st, int row0, int rows, int n, int d) {
    for (int i = threadIdx.y * gl::WARP + threadIdx.x; i < rows * d; i += THREADS) {
        int r = i / d, j = i - r * d;
        dst[r * stride + j] = row0 + r < n ? src[int64_t(row0 + r) * st + j] : 0.f;
    }
}

/* ------------------------------------------------------------------------ forward */
template <int DPL>
__global__ void __launch_bounds__(THREADS)
flash_forward_kernel(float *__restrict__ o, float *__restrict__ lse, const float *__restrict__ q,
                     const float *__restrict__ k, const float *__restrict__ v, Layout lq,
                     Layout lk, Layout lv, Layout lo, int64_t nh, int tq, int tk, int d,
                     float scale_log2, int causal) {
    GL_DYNAMIC_SMEM(float, smem);
    const int ks = gl::odd_stride(d);
    GL_SMEM_PTR(float) q_s = smem;                /* (FWD_ROWS, d) */
    GL_SMEM_PTR(float) k_s = q_s + FWD_ROWS * d;  /* (KEYS, ks) */
    GL_SMEM_PTR(float) v_s = k_s + KEYS * ks;     /* (KEYS, d) */
    GL_SMEM_PTR(float) p_s = v_s + KEYS * d;      /* (WARPS, KEYS) */
    const int lane = threadIdx.x, warp = threadIdx.y;
    const int tiles = (tq + FWD_ROWS - 1) / FWD_ROWS;
    const int64_t bh = blockIdx.x / tiles;
    const int q0 = int(blockIdx.x % tiles) * FWD_ROWS;
    q += slice_offset(lq, bh, nh);
    k += slice_offset(lk, bh, nh);
    v += slice_offset(lv, bh, nh);
    o += slice_offset(lo, bh, nh);
    lse += bh * tq;

    stage(q_s, d, q, lq.t, q0, FWD_ROWS, tq, d);
    float m[FWD_ROWS_PER_WARP], l[FWD_ROWS_PER_WARP], acc[FWD_ROWS_PER_WARP][DPL];
#pragma unroll
    for (int i = 0; i < FWD_ROWS_PER_WARP; i++) {
        m[i] = -INFINITY;
        l[i] = 0.f;
#pragma unroll
        for (int t = 0; t < DPL; t++) acc[i][t] = 0.f;
    }
    /* keys [0, k_end) can be visible to some query of this tile */
    const int q_last = gl::imin(q0 + FWD_ROWS, tq) - 1;
    const int k_end = causal ? gl::imax(0, gl::imin(tk, q_last + (tk - tq) + 1)) : tk;

    for (int k0 = 0; k0 < k_end; k0 += KEYS) {
        __syncthreads(); /* q_s is complete; nobody still reads the previous K, V tile */
        stage(k_s, ks, k, lk.t, k0, KEYS, tk, d);
        stage(v_s, d, v, lv.t, k0, KEYS, tk, d);
        __syncthreads(); /* the K, V tile is complete before anyone reads it */
#pragma unroll
        for (int i = 0; i < FWD_ROWS_PER_WARP; i++) {
            const int rl = warp + WARPS * i, r = q0 + rl, c = k0 + lane;
            float s = -INFINITY;
            if (visible(r, c, tq, tk, causal))
                s = blocked_dot(q_s + rl * d, k_s + lane * ks, d) * scale_log2;
            const float m_new = fmaxf(m[i], gl::warp_max(s));
            const float shift = m_new == -INFINITY ? 0.f : m_new;
            const float p = exp2f(s - shift);          /* 0 where masked */
            const float alpha = exp2f(m[i] - shift);   /* rescales the old sum and output */
            l[i] = alpha * l[i] + gl::warp_sum(p);
            m[i] = m_new;
            p_s[warp * KEYS + lane] = p;
            __syncwarp();
#pragma unroll
            for (int t = 0; t < DPL; t++) {
                const int j = lane + gl::WARP * t;
                float a = alpha * acc[i][t];
                if (j < d)
                    for (int c2 = 0; c2 < KEYS; c2++) a += p_s[warp * KEYS + c2] * v_s[c2 * d + j];
                acc[i][t] = a;
            }
            __syncwarp(); /* every lane has read this row's p before the next row writes it */
        }
    }
#pragma unroll
    for (int i = 0; i < FWD_ROWS_PER_WARP; i++) {
        const int r = q0 + warp + WARPS * i;
        if (r >= tq) continue;
        const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
#pragma unroll
        for (int t = 0; t < DPL; t++) {
            const int j = lane + gl::WARP * t;
            if (j < d) o[int64_t(r) * lo.t + j] = acc[i][t] * inv;
        }
        /* m + log2 l and the product by ln 2 in double, rounded once: the backward's
         * P = exp2(S·log2 e − L·log2 e) inherits this error on every key of the row (three
         * float32 roundings gave up to 2.4 ulp). log2f's own error stays: a double log2 is a
         * software routine that made this kernel spill registers on sm_90. */
        if (lane == 0)
            lse[r] = l[i] > 0.f ? float((double(m[i]) + double(log2f(l[i]))) * LN2_D) : INFINITY;
    }
}

/* ------------------------------------------------------------------------ backward */
/* D = rowsum(dO ⊙ O), one warp per row; zero the row's dQ accumulator. */
__global__ void __launch_bounds__(THREADS)
flash_backward_prep_kernel(float *__restrict__ dq_acc, float *__restrict__ dvec,
                           const float *__restrict__ o, const float *__restrict__ dout,
                           Layout lo, Layout ldo, int64_t nh, int64_t rows, int tq, int d) {
    const int64_t row = int64_t(blockIdx.x) * WARPS + threadIdx.y;
    const int lane = threadIdx.x;
    if (row >= rows) return; /* the whole warp leaves: no block-wide barrier follows */
    const int64_t bh = row / tq, i = row - bh * tq;
    const float *orow = o + slice_offset(lo, bh, nh) + i * lo.t;
    const float *dorow = dout + slice_offset(ldo, bh, nh) + i * ldo.t;
    float dot = 0.f;
    for (int j = lane; j < d; j += gl::WARP) {
        dot += dorow[j] * orow[j];
        dq_acc[row * d + j] = 0.f;
    }
    dot = gl::warp_sum(dot);
    if (lane == 0) dvec[row] = dot;
}

template <int DPL>
__global__ void __launch_bounds__(THREADS)
flash_backward_kernel(float *__restrict__ dk, float *__restrict__ dv,
                      GL_GLOBAL_PTR(float) dq_acc, const float *__restrict__ dvec,
                      const float *__restrict__ q, const float *__restrict__ k,
                      const float *__restrict__ v, const float *__restrict__ lse,
                      const float *__restrict__ dout, Layout lq, Layout lk, Layout lv, Layout ldo,
                      Layout ldk, Layout ldv, int64_t nh, int tq, int tk, int d, float scale,
                      int causal) {
    GL_DYNAMIC_SMEM(float, smem);
    const int ks = gl::odd_stride(d);
    GL_SMEM_PTR(float) q_s = smem;                          /* (BWD_ROWS, d) */
    GL_SMEM_PTR(float) do_s = q_s + BWD_ROWS * d;           /* (BWD_ROWS, d) */
    GL_SMEM_PTR(float) k_s = do_s + BWD_ROWS * d;           /* (KEYS, ks) */
    GL_SMEM_PTR(float) v_s = k_s + KEYS * ks;               /* (KEYS, ks) */
    GL_SMEM_PTR(float) p_s = v_s + KEYS * ks;               /* (BWD_ROWS, KEYS + 1) */
    GL_SMEM_PTR(float) ds_s = p_s + BWD_ROWS * (KEYS + 1);  /* (BWD_ROWS, KEYS + 1) */
    GL_SMEM_PTR(float) l_s = ds_s + BWD_ROWS * (KEYS + 1);  /* (BWD_ROWS): log2-sum-exp, hi */
    GL_SMEM_PTR(float) d_s = l_s + BWD_ROWS;                /* (BWD_ROWS): D */
    GL_SMEM_PTR(float) llo_s = d_s + BWD_ROWS;              /* (BWD_ROWS): log2-sum-exp, lo */
    const int lane = threadIdx.x, warp = threadIdx.y, tid = warp * gl::WARP + lane;
    const int tiles = (tk + KEYS - 1) / KEYS;
    const int64_t bh = blockIdx.x / tiles;
    const int k0 = int(blockIdx.x % tiles) * KEYS;
    const float scale_log2 = scale * gl::LOG2E;
    q += slice_offset(lq, bh, nh);
    dout += slice_offset(ldo, bh, nh);
    dq_acc += bh * tq * d;
    lse += bh * tq;
    dvec += bh * tq;
    k += slice_offset(lk, bh, nh);
    v += slice_offset(lv, bh, nh);
    dk += slice_offset(ldk, bh, nh);
    dv += slice_offset(ldv, bh, nh);

    stage(k_s, ks, k, lk.t, k0, KEYS, tk, d);
    stage(v_s, ks, v, lv.t, k0, KEYS, tk, d);
    float dk_acc[BWD_KEYS_PER_WARP][DPL], dv_acc[BWD_KEYS_PER_WARP][DPL];
#pragma unroll
    for (int u = 0; u < BWD_KEYS_PER_WARP; u++)
#pragma unroll
        for (int t = 0; t < DPL; t++) dk_acc[u][t] = dv_acc[u][t] = 0.f;

    /* the first query that sees key k0 (causal): r + (tk - tq) >= k0 */
    const int r_begin = causal ? gl::imax(0, k0 - (tk - tq)) / BWD_ROWS * BWD_ROWS : 0;
    for (int r0 = r_begin; r0 < tq; r0 += BWD_ROWS) {
        __syncthreads(); /* K, V staged; nobody still reads the previous query tile */
        stage(q_s, d, q, lq.t, r0, BWD_ROWS, tq, d);
        stage(do_s, d, dout, ldo.t, r0, BWD_ROWS, tq, d);
        if (tid < BWD_ROWS) {
            const bool in = r0 + tid < tq;
            /* L·log2 e as the float sum hi + lo: one float would put up to half an ulp of
             * log2(tk) (and more) of error into every P of the row, which dQ does not average */
            const float lse_r = in ? lse[r0 + tid] : INFINITY;
            const double l2 = double(lse_r) * LOG2E_D;
            l_s[tid] = float(l2);
            llo_s[tid] = lse_r < INFINITY ? float(l2 - double(l_s[tid])) : 0.f; /* +inf: no key */
            d_s[tid] = in ? dvec[r0 + tid] : 0.f;
        }
        __syncthreads();
        /* P and dS for (row, key) = (warp + WARPS·i, lane) */
#pragma unroll
        for (int i = 0; i < BWD_ROWS_PER_WARP; i++) {
            const int rl = warp + WARPS * i;
            float p = 0.f, ds = 0.f;
            if (visible(r0 + rl, k0 + lane, tq, tk, causal)) {
                const float s = blocked_dot(q_s + rl * d, k_s + lane * ks, d);
                const float dp = blocked_dot(do_s + rl * d, v_s + lane * ks, d);
                p = exp2f((s * scale_log2 - l_s[rl]) - llo_s[rl]);
                ds = p * (dp - d_s[rl]);
            }
            p_s[rl * (KEYS + 1) + lane] = p;
            ds_s[rl * (KEYS + 1) + lane] = ds;
        }
        __syncthreads();
        /* dV += Pᵀ dO and dK += dSᵀ Q for this warp's keys, dims in registers */
#pragma unroll
        for (int u = 0; u < BWD_KEYS_PER_WARP; u++) {
            const int c = warp * BWD_KEYS_PER_WARP + u;
#pragma unroll
            for (int t = 0; t < DPL; t++) {
                const int j = lane + gl::WARP * t;
                if (j >= d) continue;
                float a = dv_acc[u][t], b = dk_acc[u][t];
                for (int rl = 0; rl < BWD_ROWS; rl++) {
                    a += p_s[rl * (KEYS + 1) + c] * do_s[rl * d + j];
                    b += ds_s[rl * (KEYS + 1) + c] * q_s[rl * d + j];
                }
                dv_acc[u][t] = a;
                dk_acc[u][t] = b;
            }
        }
        /* dQ += dS K for this warp's query rows, into the float32 workspace */
#pragma unroll
        for (int i = 0; i < BWD_ROWS_PER_WARP; i++) {
            const int rl = warp + WARPS * i, r = r0 + rl;
            if (r >= tq) continue;
#pragma unroll
            for (int t = 0; t < DPL; t++) {
                const int j = lane + gl::WARP * t;
                if (j >= d) continue;
                float a = 0.f;
                for (int c = 0; c < KEYS; c++) a += ds_s[rl * (KEYS + 1) + c] * k_s[c * ks + j];
                atomicAdd(&dq_acc[int64_t(r) * d + j], a);
            }
        }
        /* dK and dV sum over up to tq query rows: one running float32 sum over all of them has an
         * error that grows with tq (causal: the first keys' sums hold a large early term while
         * ever more small ones are added). So the registers hold the sum over one block of
         * QBLOCK rows, added at the block's end into dk, dv in global memory (only this thread
         * writes these elements): about QBLOCK + tq / QBLOCK additions per element, not tq.
         * The loop runs at least once (r_begin <= tq - 1), so every element is written. */
        if ((r0 + BWD_ROWS - r_begin) % QBLOCK == 0 || r0 + BWD_ROWS >= tq) {
            const bool first_block = r0 - r_begin < QBLOCK;
#pragma unroll
            for (int u = 0; u < BWD_KEYS_PER_WARP; u++) {
                const int c = k0 + warp * BWD_KEYS_PER_WARP + u;
                float *dkc = dk + int64_t(c) * ldk.t, *dvc = dv + int64_t(c) * ldv.t;
#pragma unroll
                for (int t = 0; t < DPL; t++) {
                    const int j = lane + gl::WARP * t;
                    if (c < tk && j < d) {
                        dkc[j] = (first_block ? 0.f : dkc[j]) + scale * dk_acc[u][t];
                        dvc[j] = (first_block ? 0.f : dvc[j]) + dv_acc[u][t];
                    }
                    dk_acc[u][t] = dv_acc[u][t] = 0.f;
                }
            }
        }
    }
}

__global__ void __launch_bounds__(THREADS)
flash_backward_dq_kernel(float *__restrict__ dq, const float *__restrict__ dq_acc, Layout ldq,
                         int64_t nh, int64_t n, int tq, int d, float scale) {
    for (int64_t i = int64_t(blockIdx.x) * THREADS + threadIdx.y * gl::WARP + threadIdx.x; i < n;
         i += int64_t(gridDim.x) * THREADS) {
        const int64_t row = i / d, bh = row / tq, r = row - bh * tq;
        dq[slice_offset(ldq, bh, nh) + r * ldq.t + (i - row * d)] = scale * dq_acc[i];
    }
}

int check_sizes(const char *fn, int64_t nb, int64_t nh, int64_t tq, int64_t tk, int64_t d,
                float scale) {
    if (nb < 1 || nh < 1 || tq < 1 || tk < 1 || d < 1)
        return gl::fail(GPTLAB_EINVAL,
                        "%s: sizes must be >= 1 (b=%lld nh=%lld tq=%lld tk=%lld d=%lld)", fn,
                        (long long)nb, (long long)nh, (long long)tq, (long long)tk,
                        (long long)d);
    const int64_t bh = nb * nh;
    if (d > gl::MAX_HEAD_DIM)
        return gl::fail(GPTLAB_EINVAL, "%s: head dim %lld > %d", fn, (long long)d,
                        gl::MAX_HEAD_DIM);
    if (tq > INT32_MAX / 2 || tk > INT32_MAX / 2)
        return gl::fail(GPTLAB_EINVAL, "%s: sequence length too large", fn);
    /* every grid is one-dimensional: at most 2^31 - 1 blocks */
    const int64_t blocks = std::max({bh * gl::ceil_div(tq, FWD_ROWS), bh * gl::ceil_div(tk, KEYS),
                                     gl::ceil_div(bh * tq, WARPS)});
    if (blocks > INT32_MAX)
        return gl::fail(GPTLAB_EINVAL, "%s: bh*tq, bh*tk too large for one launch", fn);
    if (!(scale > 0.f) || !std::isfinite(scale))
        return gl::fail(GPTLAB_EINVAL, "%s: scale must be finite and > 0, got %g", fn, scale);
    return GPTLAB_OK;
}

} /* namespace */

extern "C" int gptlab_flash_forward_f32(float *o, float *lse, const float *q, const float *k,
                                        const float *v, const int64_t *strides, int64_t b,
                                        int64_t nh, int64_t tq, int64_t tk, int64_t d,
                                        float scale, int causal, void *stream,
                                        int num_threads) {
    (void)num_threads;
    gl::clear_error();
    if (!o || !lse || !q || !k || !v || !strides)
        return gl::fail(GPTLAB_EINVAL, "flash_forward: null pointer");
    if (int rc = check_sizes("flash_forward", b, nh, tq, tk, d, scale)) return rc;
    const int64_t bh = b * nh;
    gl::DeviceGuard device;
    if (int rc = device.bind(o, "flash_forward")) return rc;
    const dim3 grid(unsigned(bh * gl::ceil_div(tq, FWD_ROWS))), block(gl::WARP, WARPS);
    const size_t smem = size_t(fwd_smem_floats(int(d))) * sizeof(float);
    gl::with_dims_per_lane(d, [&](auto dims_per_lane) {
        constexpr int DPL = decltype(dims_per_lane)::value;
        GL_LAUNCH(flash_forward_kernel<DPL>, grid, block, smem, stream, o, lse, q, k, v,
                  layout_at(strides, 0), layout_at(strides, 1), layout_at(strides, 2),
                  layout_at(strides, 3), nh, int(tq), int(tk), int(d), scale * gl::LOG2E, causal);
    });
    return gl::check_launch("flash_forward");
}

extern "C" int64_t gptlab_flash_backward_workspace_size(int64_t bh, int64_t tq, int64_t tk,
                                                        int64_t d) {
    (void)tk;
    return bh * tq * (d + 1) * int64_t(sizeof(float));
}

extern "C" int gptlab_flash_backward_f32(float *dq, float *dk, float *dv, void *workspace,
                                         const float *q, const float *k, const float *v,
                                         const float *o, const float *lse, const float *dout,
                                         const int64_t *strides, int64_t b, int64_t nh,
                                         int64_t tq, int64_t tk, int64_t d, float scale,
                                         int causal, void *stream, int num_threads) {
    (void)num_threads;
    gl::clear_error();
    if (!dq || !dk || !dv || !workspace || !q || !k || !v || !o || !lse || !dout || !strides)
        return gl::fail(GPTLAB_EINVAL, "flash_backward: null pointer");
    if (int rc = check_sizes("flash_backward", b, nh, tq, tk, d, scale)) return rc;
    const int64_t bh = b * nh;
    /* strides: q, k, v, o, dout, dq, dk, dv */
    const Layout lq = layout_at(strides, 0), lk = layout_at(strides, 1),
                 lv = layout_at(strides, 2), lo = layout_at(strides, 3),
                 ldo = layout_at(strides, 4), ldq = layout_at(strides, 5),
                 ldk = layout_at(strides, 6), ldv = layout_at(strides, 7);
    gl::DeviceGuard device;
    if (int rc = device.bind(dq, "flash_backward")) return rc;
    float *dq_acc = static_cast<float *>(workspace);
    float *dvec = dq_acc + bh * tq * d;
    const dim3 block(gl::WARP, WARPS);

    const int64_t rows = bh * tq;
    GL_LAUNCH(flash_backward_prep_kernel, dim3(unsigned(gl::ceil_div(rows, WARPS))), block, 0,
              stream, dq_acc, dvec, o, dout, lo, ldo, nh, rows, int(tq), int(d));
    if (int rc = gl::check_launch("flash_backward (prep)")) return rc;

    const dim3 grid(unsigned(bh * gl::ceil_div(tk, KEYS)));
    const size_t smem = size_t(bwd_smem_floats(int(d))) * sizeof(float);
    gl::with_dims_per_lane(d, [&](auto dims_per_lane) {
        constexpr int DPL = decltype(dims_per_lane)::value;
        GL_LAUNCH(flash_backward_kernel<DPL>, grid, block, smem, stream, dk, dv, dq_acc, dvec, q,
                  k, v, lse, dout, lq, lk, lv, ldo, ldk, ldv, nh, int(tq), int(tk), int(d), scale,
                  causal);
    });
    if (int rc = gl::check_launch("flash_backward")) return rc;

    const int64_t n = rows * d;
    const int64_t blocks = std::min<int64_t>(gl::ceil_div(n, THREADS), 65535);
    GL_LAUNCH(flash_backward_dq_kernel, dim3(unsigned(blocks)), block, 0, stream, dq, dq_acc, ldq,
              nh, n, int(tq), int(d), scale);
    return gl::check_launch("flash_backward (dq)");
}
