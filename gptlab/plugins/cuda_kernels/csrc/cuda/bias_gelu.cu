/* Bias + GELU in CUDA, float32: y = gelu(x + bias), gelu(u) = u * Phi(u) with the exact (erf)
 * GELU of Hendrycks & Gimpel 2016 (F.gelu's default), and its backward.
 *
 * Phi(u) = erfc(-u / sqrt 2) / 2: one erfcf, accurate relative to Phi on both sides (the usual
 * (1 + erf(u / sqrt 2)) / 2 cancels for u << 0);
 * gelu'(u) = Phi(u) + u * exp(-u^2 / 2) / sqrt(2 pi).
 * Forward: elementwise, grid-stride; x + bias stays in registers.
 * Backward: one block per (chunk of 32 rows, strip of 32 columns), COLS x SLICES threads: each
 * thread writes dx for its column on rows ty, ty + 8, ... of the chunk and keeps their sum; the
 * sums go through shared memory in slice order into a per-chunk partial dbias, and a second
 * launch adds the chunks in order (rowwise.cuh): deterministic, no atomics.
 *
 * Reference: F.gelu(x + bias) / autograd in float64 (tests/kernels/test_rowwise_kernels.py).
 * Check:     pytest tests/kernels/test_rowwise_kernels.py -k "bias_gelu and emu" (the emulator,
 *            on the CPU); the same tests run the cuda flavour on a GPU
 * Benchmark: gpt bench ops --device cuda --ops linear_gelu  (on a GPU, vs F.gelu(linear(x)))
 * CPU twin:  ../cpu/bias_gelu.c
 */
#include <algorithm>

#include "rowwise.cuh"

namespace {

constexpr int THREADS = 256;
constexpr float SQRT1_2 = 0.7071067811865476f;
constexpr float INV_SQRT_2PI = 0.3989422804014327f;

__device__ __forceinline__ float normal_cdf(float u) { return 0.5f * erfcf(-u * SQRT1_2); }

__global__ void __launch_bounds__(THREADS)
bias_gelu_forward_kernel(float *__restrict__ y, const float *__restrict__ x,
                         const float *__restrict__ bias, int64_t total, int f) {
    const int64_t stride = int64_t(gridDim.x) * THREADS;
    for (int64_t i = int64_t(blockIdx.x) * THREADS + threadIdx.x; i < total; i += stride) {
        const float u = x[i] + bias[i % f];
        y[i] = u * normal_cdf(u);
    }
}

/* grid (chunks, column strips), block (COLS, SLICES); partials [chunk][f] (NULL: no dbias). */
__global__ void __launch_bounds__(gl::COLS * gl::SLICES)
bias_gelu_backward_kernel(float *dx, float *__restrict__ partials, const float *dy,
                          const float *__restrict__ x, const float *__restrict__ bias,
                          int64_t rows, int f) {
    GL_DYNAMIC_SMEM(float, sm); /* [SLICES][COLS] */
    const int64_t chunk = blockIdx.x, r0 = chunk * gl::CHUNK_ROWS;
    const int64_t r1 = r0 + gl::CHUNK_ROWS < rows ? r0 + gl::CHUNK_ROWS : rows;
    const int col = int(blockIdx.y) * gl::COLS + int(threadIdx.x);
    float db = 0.f;
    if (col < f) {
        const float b = bias[col];
        for (int64_t r = r0 + threadIdx.y; r < r1; r += gl::SLICES) {
            const float u = x[r * f + col] + b;
            /* dx may alias dy: the element is read, then written, by this thread only */
            const float g = dy[r * f + col] * (normal_cdf(u) + u * expf(-0.5f * u * u) *
                                                                   INV_SQRT_2PI);
            dx[r * f + col] = g;
            db += g;
        }
    }
    if (partials) { /* uniform over the block: every thread reaches the barrier or none */
        db = gl::sum_slices(sm, db);
        if (threadIdx.y == 0 && col < f) partials[chunk * f + col] = db;
    }
}

int check_sizes(const char *fn, int64_t rows, int64_t f) {
    if (rows < 1 || f < 1)
        return gl::fail(GPTLAB_EINVAL, "%s: sizes must be >= 1 (rows=%lld f=%lld)", fn,
                        (long long)rows, (long long)f);
    if (f > gl::MAX_COLS)
        return gl::fail(GPTLAB_EINVAL, "%s: f = %lld > %d", fn, (long long)f, gl::MAX_COLS);
    if (gl::num_chunks(rows) > INT32_MAX)
        return gl::fail(GPTLAB_EINVAL, "%s: too many rows for one launch", fn);
    return GPTLAB_OK;
}

} /* namespace */

extern "C" int gptlab_bias_gelu_forward_f32(float *y, const float *x, const float *bias,
                                            int64_t rows, int64_t f, void *stream,
                                            int num_threads) {
    (void)num_threads;
    gl::clear_error();
    if (!y || !x || !bias) return gl::fail(GPTLAB_EINVAL, "bias_gelu_forward: null pointer");
    if (int rc = check_sizes("bias_gelu_forward", rows, f)) return rc;
    gl::DeviceGuard device;
    if (int rc = device.bind(y, "bias_gelu_forward")) return rc;
    const int64_t total = rows * f;
    const dim3 grid(unsigned(std::min<int64_t>(gl::ceil_div(total, THREADS), 8192)));
    GL_LAUNCH(bias_gelu_forward_kernel, grid, dim3(THREADS), 0, stream, y, x, bias, total,
              int(f));
    return gl::check_launch("bias_gelu_forward");
}

extern "C" int64_t gptlab_bias_gelu_backward_workspace_size(int64_t rows, int64_t f) {
    if (rows < 1 || f < 1) return 0;
    return gl::num_chunks(rows) * f * int64_t(sizeof(float));
}

extern "C" int gptlab_bias_gelu_backward_f32(float *dx, float *dbias, void *workspace,
                                             const float *dy, const float *x, const float *bias,
                                             int64_t rows, int64_t f, void *stream,
                                             int num_threads) {
    (void)num_threads;
    gl::clear_error();
    if (!dx || !dy || !x || !bias || (dbias && !workspace))
        return gl::fail(GPTLAB_EINVAL, "bias_gelu_backward: null pointer");
    if (int rc = check_sizes("bias_gelu_backward", rows, f)) return rc;
    gl::DeviceGuard device;
    if (int rc = device.bind(dx, "bias_gelu_backward")) return rc;
    float *partials = dbias ? static_cast<float *>(workspace) : nullptr;
    const int64_t nchunks = gl::num_chunks(rows);
    const dim3 grid(unsigned(nchunks), unsigned(gl::ceil_div(f, gl::COLS)));
    GL_LAUNCH(bias_gelu_backward_kernel, grid, dim3(gl::COLS, gl::SLICES),
              gl::SLICES * gl::COLS * sizeof(float), stream, dx, partials, dy, x, bias, rows,
              int(f));
    if (int rc = gl::check_launch("bias_gelu_backward")) return rc;
    if (!dbias) return GPTLAB_OK;
    const dim3 sgrid(unsigned(gl::ceil_div(f, gl::SUM_THREADS)));
    GL_LAUNCH(gl::sum_chunks_kernel<gl::SUM_THREADS>, sgrid, dim3(gl::SUM_THREADS), 0, stream,
              dbias, partials, nchunks, int(f), f);
    return gl::check_launch("bias_gelu_backward (dbias)");
}
