/* Column sums over rows without atomics, for the parameter gradients of the row-wise kernels
 * (dweight and dbias of layernorm.cu, dbias of bias_gelu.cu).
 *
 * Stage 1 (in each kernel): a block of COLS x SLICES threads takes one chunk of CHUNK_ROWS rows
 * and COLS columns; lane tx owns column col, slice ty adds rows ty, ty + SLICES, ...; the
 * SLICES partial sums are added in shared memory in slice order, and the chunk's sums written to
 * a workspace row partials[chunk * stride + col]. Reads are coalesced: a warp reads 32
 * consecutive floats of one row.
 * Stage 2 (sum_chunks_kernel): one thread per column adds the chunks' rows in chunk order.
 * Chunks depend on the number of rows only, so every sum is taken in the same order on every
 * run and every GPU: the parameter gradients are deterministic (no atomicAdd anywhere).
 */
#ifndef GPTLAB_CUDA_ROWWISE_CUH
#define GPTLAB_CUDA_ROWWISE_CUH

#include "common.cuh"

namespace gl {

constexpr int COLS = WARP;        /* columns per column-sum block: one per lane */
constexpr int SLICES = 8;         /* warps per column-sum block */
constexpr int CHUNK_ROWS = 32;    /* rows per chunk */
constexpr int MAX_COLS = 65535 * COLS; /* column strips go on grid.y */

inline int64_t num_chunks(int64_t rows) { return ceil_div(rows, CHUNK_ROWS); }

/* Stage 1's last step: add the SLICES values in sm[0 .. SLICES*COLS) (slice-major) in slice
 * order; called by every thread of the block (it holds a barrier); returns the sum to ty == 0. */
__device__ __forceinline__ float sum_slices(GL_SMEM_PTR(float) sm, float v) {
    sm[threadIdx.y * COLS + threadIdx.x] = v;
    __syncthreads();
    float total = 0.f;
    if (threadIdx.y == 0)
        for (int s = 0; s < SLICES; s++) total += sm[s * COLS + threadIdx.x];
    return total;
}

/* out[col] = sum over chunks k in order of partials[k * stride + col]. A template, so that a
 * file that includes this header without launching it defines nothing. */
template <int THREADS>
__global__ void __launch_bounds__(THREADS)
sum_chunks_kernel(float *__restrict__ out, const float *__restrict__ partials, int64_t nchunks,
                  int n, int64_t stride) {
    const int col = int(blockIdx.x) * THREADS + int(threadIdx.x);
    if (col >= n) return;
    float acc = 0.f;
    for (int64_t k = 0; k < nchunks; k++) acc += partials[k * stride + col];
    out[col] = acc;
}

constexpr int SUM_THREADS = 128;

} /* namespace gl */

#endif /* GPTLAB_CUDA_ROWWISE_CUH */
