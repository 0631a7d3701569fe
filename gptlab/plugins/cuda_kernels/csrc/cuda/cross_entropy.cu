/* Softmax cross-entropy over the vocabulary in CUDA, float32: loss and gradient in one pass per
 * row (llm.c's fused classifier idea), and the backward scale.
 *
 * Forward, one warp per row (4 rows per 128-thread block): m = warp_max(x),
 * s = warp_sum(exp(x - m)), losses[row] = m + log s - x[t]; with dlogits, a third pass writes
 * (exp(x - m) / s - [col == t]) / n, so no probability tensor exists besides the gradient.
 * A second launch, one block, adds losses in a fixed order (each thread a strided run, then a
 * shared-memory tree) and writes the mean: deterministic, no atomics.
 * Targets are not checked on the host (that would copy them back); a target outside [0, v)
 * makes its row's loss and dlogits NaN, so the mean loss is NaN. (The op layer checks targets
 * that live in host memory, which covers the emulator, before calling.)
 * Backward: dx = dlogits * dloss[0], dloss read on the device.
 *
 * Reference: F.cross_entropy in float64 (tests/kernels/test_rowwise_kernels.py).
 * Check:     pytest tests/kernels/test_rowwise_kernels.py -k "cross_entropy and emu" (the
 *            emulator, on the CPU); the same tests run the cuda flavour on a GPU
 * Benchmark: gpt bench ops --device cuda --ops cross_entropy  (on a GPU, vs
 *            F.cross_entropy)
 * CPU twin:  ../cpu/cross_entropy.c
 */
#include <algorithm>

#include "common.cuh"

namespace {

constexpr int ROWS_PER_BLOCK = 4; /* one warp per row */
constexpr int MEAN_THREADS = 256;
constexpr int SCALE_THREADS = 256;

__global__ void __launch_bounds__(ROWS_PER_BLOCK * gl::WARP)
cross_entropy_forward_kernel(float *__restrict__ losses, float *__restrict__ dlogits,
                             const float *__restrict__ logits,
                             const int64_t *__restrict__ targets, int64_t n, int v,
                             float inv_n) {
    const int64_t row = int64_t(blockIdx.x) * ROWS_PER_BLOCK + threadIdx.y;
    const int lane = threadIdx.x;
    if (row >= n) return; /* the whole warp leaves: no block-wide barrier follows */
    const float *xr = logits + row * v;
    const int64_t t = targets[row];
    const bool bad = t < 0 || t >= v;
    float m = -INFINITY;
    for (int col = lane; col < v; col += gl::WARP) m = fmaxf(m, xr[col]);
    m = gl::warp_max(m);
    float s = 0.f;
    for (int col = lane; col < v; col += gl::WARP) s += expf(xr[col] - m);
    s = gl::warp_sum(s);
    if (lane == 0) losses[row] = bad ? NAN : m + logf(s) - xr[t];
    if (dlogits) {
        float *dl = dlogits + row * v;
        const float scale = inv_n / s;
        for (int col = lane; col < v; col += gl::WARP) {
            const float p = expf(xr[col] - m) * scale;
            dl[col] = bad ? NAN : (col == t ? p - inv_n : p);
        }
    }
}

/* One block: loss[0] = (sum of losses) / n, in a fixed order. */
__global__ void __launch_bounds__(MEAN_THREADS)
cross_entropy_mean_kernel(float *__restrict__ loss, const float *__restrict__ losses, int64_t n) {
    GL_DYNAMIC_SMEM(float, sm); /* [MEAN_THREADS] */
    const int tid = threadIdx.x;
    float acc = 0.f;
    for (int64_t i = tid; i < n; i += MEAN_THREADS) acc += losses[i];
    sm[tid] = acc;
    __syncthreads();
    for (int half = MEAN_THREADS / 2; half > 0; half /= 2) {
        if (tid < half) sm[tid] += sm[tid + half];
        __syncthreads();
    }
    if (tid == 0) loss[0] = sm[0] / float(n);
}

__global__ void __launch_bounds__(SCALE_THREADS)
cross_entropy_backward_kernel(float *dx, const float *dlogits, const float *__restrict__ dloss,
                              int64_t total) {
    const float g = dloss[0];
    const int64_t stride = int64_t(gridDim.x) * SCALE_THREADS;
    /* dx may alias dlogits: each element is read, then written, by the same thread */
    for (int64_t i = int64_t(blockIdx.x) * SCALE_THREADS + threadIdx.x; i < total; i += stride)
        dx[i] = dlogits[i] * g;
}

int check_sizes(const char *fn, int64_t n, int64_t v) {
    if (n < 1 || v < 1)
        return gl::fail(GPTLAB_EINVAL, "%s: sizes must be >= 1 (n=%lld v=%lld)", fn,
                        (long long)n, (long long)v);
    if (v > INT32_MAX / 2)
        return gl::fail(GPTLAB_EINVAL, "%s: vocabulary too large", fn);
    if (gl::ceil_div(n, ROWS_PER_BLOCK) > INT32_MAX)
        return gl::fail(GPTLAB_EINVAL, "%s: too many rows for one launch", fn);
    return GPTLAB_OK;
}

} /* namespace */

extern "C" int gptlab_cross_entropy_forward_f32(float *loss, float *losses, float *dlogits,
                                                const float *logits, const int64_t *targets,
                                                int64_t n, int64_t v, void *stream,
                                                int num_threads) {
    (void)num_threads;
    gl::clear_error();
    if (!loss || !losses || !logits || !targets)
        return gl::fail(GPTLAB_EINVAL, "cross_entropy_forward: null pointer");
    if (int rc = check_sizes("cross_entropy_forward", n, v)) return rc;
    gl::DeviceGuard device;
    if (int rc = device.bind(losses, "cross_entropy_forward")) return rc;
    const dim3 grid(unsigned(gl::ceil_div(n, ROWS_PER_BLOCK))), block(gl::WARP, ROWS_PER_BLOCK);
    GL_LAUNCH(cross_entropy_forward_kernel, grid, block, 0, stream, losses, dlogits, logits,
              targets, n, int(v), 1.f / float(n));
    if (int rc = gl::check_launch("cross_entropy_forward")) return rc;
    GL_LAUNCH(cross_entropy_mean_kernel, dim3(1), dim3(MEAN_THREADS),
              MEAN_THREADS * sizeof(float), stream, loss, losses, n);
    return gl::check_launch("cross_entropy_forward (mean)");
}

extern "C" int gptlab_cross_entropy_backward_f32(float *dx, const float *dlogits,
                                                 const float *dloss, int64_t n, int64_t v,
                                                 void *stream, int num_threads) {
    (void)num_threads;
    gl::clear_error();
    if (!dx || !dlogits || !dloss)
        return gl::fail(GPTLAB_EINVAL, "cross_entropy_backward: null pointer");
    if (int rc = check_sizes("cross_entropy_backward", n, v)) return rc;
    gl::DeviceGuard device;
    if (int rc = device.bind(dx, "cross_entropy_backward")) return rc;
    const int64_t total = n * v;
    const dim3 grid(unsigned(std::min<int64_t>(gl::ceil_div(total, SCALE_THREADS), 4096)));
    GL_LAUNCH(cross_entropy_backward_kernel, grid, dim3(SCALE_THREADS), 0, stream, dx, dlogits,
              dloss, total);
    return gl::check_launch("cross_entropy_backward");
}
