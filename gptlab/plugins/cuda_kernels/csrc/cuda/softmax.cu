/* Fused scale + causal mask + softmax over the last dim, forward and backward, in CUDA.
 *
 * One warp per row (4 rows per 128-thread block): lanes stride over the row's columns, a
 * butterfly warp_max / warp_sum combines them, and every element is read from global memory
 * once per pass. Forward: y = exp2(x·scale·log2 e − m) / Σ, masked entries 0 (a row with no
 * visible key is all 0, never NaN). Backward: dx = scale · y ⊙ (dy − Σ y ⊙ dy); dx may alias dy
 * (each lane reads an element before writing it, and the sum is complete before any write).
 *
 * Reference: torch.softmax in float64; through the `fused` backend
 *            gptlab.testing.reference_attention.
 * Check:     gpt kernels check --flavour cuda-emu  (the emulator, on the CPU; pytest
 *            tests/kernels/test_cuda_emulated.py), gpt kernels check --flavour cuda (on a GPU)
 * Benchmark: gpt bench attention --device cuda --backends fused  (on a GPU, vs sdpa)
 * CPU twin:  ../cpu/softmax.c
 */
#include "common.cuh"

namespace {

constexpr int ROWS_PER_BLOCK = 4; /* one warp per row */

__device__ __forceinline__ int visible_keys(int64_t row, int tq, int tk, int causal) {
    /* bottom-right causal mask: query i sees keys j <= i + (tk - tq) */
    if (!causal) return tk;
    int64_t n = row % tq + 1 + (tk - tq);
    return n < 0 ? 0 : (n > tk ? tk : int(n));
}

__global__ void __launch_bounds__(ROWS_PER_BLOCK * gl::WARP)
softmax_forward_kernel(float *__restrict__ y, const float *__restrict__ x, int64_t rows, int tq,
                       int tk, float scale_log2, int causal) {
    const int64_t row = int64_t(blockIdx.x) * ROWS_PER_BLOCK + threadIdx.y;
    const int lane = threadIdx.x;
    if (row >= rows) return; /* the whole warp leaves: no block-wide barrier follows */
    const float *xr = x + row * tk;
    float *yr = y + row * tk;
    const int n = visible_keys(row, tq, tk, causal);

    float m = -INFINITY;
    for (int c = lane; c < n; c += gl::WARP) m = fmaxf(m, xr[c]);
    m = gl::warp_max(m);
    const float shift = m == -INFINITY ? 0.f : m * scale_log2; /* never -inf - -inf */
    float sum = 0.f;
    for (int c = lane; c < n; c += gl::WARP) sum += exp2f(xr[c] * scale_log2 - shift);
    sum = gl::warp_sum(sum);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int c = lane; c < tk; c += gl::WARP)
        yr[c] = c < n ? exp2f(xr[c] * scale_log2 - shift) * inv : 0.f;
}

__global__ void __launch_bounds__(ROWS_PER_BLOCK * gl::WARP)
softmax_backward_kernel(float *dx, const float *__restrict__ y, const float *dy, int64_t rows,
                        int tk, float scale) {
    const int64_t row = int64_t(blockIdx.x) * ROWS_PER_BLOCK + threadIdx.y;
    const int lane = threadIdx.x;
    if (row >= rows) return;
    const float *yr = y + row * tk, *dyr = dy + row * tk;
    float *dxr = dx + row * tk;
    float dot = 0.f;
    for (int c = lane; c < tk; c += gl::WARP) dot += yr[c] * dyr[c];
    dot = gl::warp_sum(dot);
    for (int c = lane; c < tk; c += gl::WARP) dxr[c] = scale * yr[c] * (dyr[c] - dot);
}

/* Validate the arguments of an entry point and bind the device that holds `out`. */
int prologue(gl::DeviceGuard &device, const void *out, const void *a, const void *b, int64_t bh,
             int64_t tq, int64_t tk, float scale, const char *fn) {
    gl::clear_error();
    if (!out || !a || !b) return gl::fail(GPTLAB_EINVAL, "%s: null pointer", fn);
    if (bh < 1 || tq < 1 || tk < 1)
        return gl::fail(GPTLAB_EINVAL, "%s: sizes must be >= 1 (bh=%lld tq=%lld tk=%lld)", fn,
                        (long long)bh, (long long)tq, (long long)tk);
    if (tq > INT32_MAX / 2 || tk > INT32_MAX / 2) /* column indices stay far from overflow */
        return gl::fail(GPTLAB_EINVAL, "%s: sequence length too large", fn);
    if (gl::ceil_div(bh * tq, ROWS_PER_BLOCK) > INT32_MAX)
        return gl::fail(GPTLAB_EINVAL, "%s: too many rows for one launch", fn);
    if (!(scale > 0.f) || !std::isfinite(scale))
        return gl::fail(GPTLAB_EINVAL, "%s: scale must be finite and > 0, got %g", fn, scale);
    return device.bind(out, fn);
}

} /* namespace */

extern "C" int gptlab_softmax_forward_f32(float *y, const float *x, int64_t bh, int64_t tq,
                                          int64_t tk, float scale, int causal, void *stream,
                                          int num_threads) {
    (void)num_threads;
    gl::DeviceGuard device;
    if (int rc = prologue(device, y, x, x, bh, tq, tk, scale, "softmax_forward")) return rc;
    const int64_t rows = bh * tq;
    dim3 grid(unsigned(gl::ceil_div(rows, ROWS_PER_BLOCK))), block(gl::WARP, ROWS_PER_BLOCK);
    GL_LAUNCH(softmax_forward_kernel, grid, block, 0, stream, y, x, rows, int(tq), int(tk),
              scale * gl::LOG2E, causal);
    return gl::check_launch("softmax_forward");
}

extern "C" int gptlab_softmax_backward_f32(float *dx, const float *y, const float *dy,
                                           int64_t bh, int64_t tq, int64_t tk, float scale,
                                           int causal, void *stream, int num_threads) {
    (void)num_threads;
    (void)causal; /* masked entries have y = 0, hence dx = 0 */
    gl::DeviceGuard device;
    if (int rc = prologue(device, dx, y, dy, bh, tq, tk, scale, "softmax_backward")) return rc;
    const int64_t rows = bh * tq;
    dim3 grid(unsigned(gl::ceil_div(rows, ROWS_PER_BLOCK))), block(gl::WARP, ROWS_PER_BLOCK);
    GL_LAUNCH(softmax_backward_kernel, grid, block, 0, stream, dx, y, dy, rows, int(tk), scale);
    return gl::check_launch("softmax_backward");
}
