/* LayerNorm over the last dim (Ba, Kiros & Hinton 2016), forward and backward, in CUDA, float32.
 *
 * Forward, one warp per row (4 rows per 128-thread block): lanes stride over the row's columns;
 * mean = warp_sum(x) / c, then var = warp_sum((x - mean)^2) / c (two passes around the mean,
 * never E[x^2] - mean^2; the second pass reads the row from L1/L2), rstd = 1 / sqrt(var + eps)
 * (IEEE sqrt and division: no --use_fast_math), y = (x - mean) * rstd * w + b. Lane 0 writes
 * the row's mean and rstd for the backward.
 * Backward, three launches, no atomics (deterministic: rowwise.cuh):
 *   1. dx, one warp per row: g = dy * w, xhat = (x - mean) * rstd,
 *      dx = rstd * (g - mean(g) - xhat * mean(g * xhat));
 *   2. per (chunk of 32 rows, strip of 32 columns): partial sums of dy * xhat and dy into the
 *      workspace, laid out [chunk][dweight | dbias][c];
 *   3. dweight and dbias: the chunks' partials added in chunk order.
 *
 * Reference: F.layer_norm / autograd in float64 (tests/kernels/test_rowwise_kernels.py).
 * Check:     pytest tests/kernels/test_rowwise_kernels.py -k "layer_norm and emu" (the
 *            emulator, on the CPU); the same tests run the cuda flavour on a GPU
 * Benchmark: gpt bench ops --device cuda --ops layer_norm  (on a GPU, vs F.layer_norm)
 * CPU twin:  ../cpu/layernorm.c
 */
#include "rowwise.cuh"

namespace {

constexpr int ROWS_PER_BLOCK = 4; /* one warp per row */

__global__ void __launch_bounds__(ROWS_PER_BLOCK * gl::WARP)
layernorm_forward_kernel(float *__restrict__ y, float *__restrict__ mean,
                         float *__restrict__ rstd, const float *__restrict__ x,
                         const float *__restrict__ w, const float *__restrict__ b, int64_t rows,
                         int c, float eps) {
    const int64_t row = int64_t(blockIdx.x) * ROWS_PER_BLOCK + threadIdx.y;
    const int lane = threadIdx.x;
    if (row >= rows) return; /* the whole warp leaves: no block-wide barrier follows */
    const float *xr = x + row * c;
    float *yr = y + row * c;
    float s = 0.f;
    for (int col = lane; col < c; col += gl::WARP) s += xr[col];
    const float m = gl::warp_sum(s) / float(c);
    float q = 0.f;
    for (int col = lane; col < c; col += gl::WARP) {
        const float d = xr[col] - m;
        q += d * d;
    }
    const float rs = 1.f / sqrtf(gl::warp_sum(q) / float(c) + eps);
    for (int col = lane; col < c; col += gl::WARP) {
        const float v = (xr[col] - m) * rs * w[col];
        yr[col] = b ? v + b[col] : v;
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = rs;
    }
}

__global__ void __launch_bounds__(ROWS_PER_BLOCK * gl::WARP)
layernorm_backward_dx_kernel(float *__restrict__ dx, const float *__restrict__ dy,
                             const float *__restrict__ x, const float *__restrict__ w,
                             const float *__restrict__ mean, const float *__restrict__ rstd,
                             int64_t rows, int c) {
    const int64_t row = int64_t(blockIdx.x) * ROWS_PER_BLOCK + threadIdx.y;
    const int lane = threadIdx.x;
    if (row >= rows) return;
    const float *xr = x + row * c, *dyr = dy + row * c;
    float *dxr = dx + row * c;
    const float m = mean[row], rs = rstd[row];
    float sg = 0.f, sgx = 0.f;
    for (int col = lane; col < c; col += gl::WARP) {
        const float g = dyr[col] * w[col];
        sg += g;
        sgx += g * (xr[col] - m) * rs;
    }
    const float a = gl::warp_sum(sg) / float(c), bq = gl::warp_sum(sgx) / float(c);
    for (int col = lane; col < c; col += gl::WARP) {
        const float xh = (xr[col] - m) * rs;
        dxr[col] = rs * (dyr[col] * w[col] - a - xh * bq);
    }
}

/* grid (chunks, column strips), block (COLS, SLICES); partials [chunk][2][c]. */
__global__ void __launch_bounds__(gl::COLS * gl::SLICES)
layernorm_backward_params_kernel(float *__restrict__ partials, const float *__restrict__ dy,
                                 const float *__restrict__ x, const float *__restrict__ mean,
                                 const float *__restrict__ rstd, int64_t rows, int c) {
    GL_DYNAMIC_SMEM(float, sm); /* [2][SLICES][COLS] */
    const int64_t chunk = blockIdx.x, r0 = chunk * gl::CHUNK_ROWS;
    const int64_t r1 = r0 + gl::CHUNK_ROWS < rows ? r0 + gl::CHUNK_ROWS : rows;
    const int col = int(blockIdx.y) * gl::COLS + int(threadIdx.x);
    float dw = 0.f, db = 0.f;
    if (col < c) {
        for (int64_t r = r0 + threadIdx.y; r < r1; r += gl::SLICES) {
            const float d = dy[r * c + col];
            dw += d * (x[r * c + col] - mean[r]) * rstd[r];
            db += d;
        }
    }
    /* every thread reaches both barriers; each sum has its own shared region */
    dw = gl::sum_slices(sm, dw);
    db = gl::sum_slices(sm + gl::SLICES * gl::COLS, db);
    if (threadIdx.y == 0 && col < c) {
        partials[chunk * 2 * c + col] = dw;
        partials[chunk * 2 * c + c + col] = db;
    }
}

int check_sizes(const char *fn, int64_t rows, int64_t c) {
    if (rows < 1 || c < 1)
        return gl::fail(GPTLAB_EINVAL, "%s: sizes must be >= 1 (rows=%lld c=%lld)", fn,
                        (long long)rows, (long long)c);
    if (c > gl::MAX_COLS)
        return gl::fail(GPTLAB_EINVAL, "%s: c = %lld > %d", fn, (long long)c, gl::MAX_COLS);
    if (gl::ceil_div(rows, ROWS_PER_BLOCK) > INT32_MAX)
        return gl::fail(GPTLAB_EINVAL, "%s: too many rows for one launch", fn);
    return GPTLAB_OK;
}

} /* namespace */

extern "C" int gptlab_layernorm_forward_f32(float *y, float *mean, float *rstd, const float *x,
                                            const float *weight, const float *bias,
                                            int64_t rows, int64_t c, float eps, void *stream,
                                            int num_threads) {
    (void)num_threads;
    gl::clear_error();
    if (!y || !mean || !rstd || !x || !weight)
        return gl::fail(GPTLAB_EINVAL, "layernorm_forward: null pointer");
    if (int rc = check_sizes("layernorm_forward", rows, c)) return rc;
    if (!(eps >= 0.f) || !std::isfinite(eps))
        return gl::fail(GPTLAB_EINVAL, "layernorm_forward: eps must be finite and >= 0, got %g",
                        eps);
    gl::DeviceGuard device;
    if (int rc = device.bind(y, "layernorm_forward")) return rc;
    const dim3 grid(unsigned(gl::ceil_div(rows, ROWS_PER_BLOCK))), block(gl::WARP, ROWS_PER_BLOCK);
    GL_LAUNCH(layernorm_forward_kernel, grid, block, 0, stream, y, mean, rstd, x, weight, bias,
              rows, int(c), eps);
    return gl::check_launch("layernorm_forward");
}

extern "C" int64_t gptlab_layernorm_backward_workspace_size(int64_t rows, int64_t c) {
    if (rows < 1 || c < 1) return 0;
    return gl::num_chunks(rows) * 2 * c * int64_t(sizeof(float));
}

extern "C" int gptlab_layernorm_backward_f32(float *dx, float *dweight, float *dbias,
                                             void *workspace, const float *dy, const float *x,
                                             const float *weight, const float *mean,
                                             const float *rstd, int64_t rows, int64_t c,
                                             void *stream, int num_threads) {
    (void)num_threads;
    gl::clear_error();
    if (!dx || !dweight || !workspace || !dy || !x || !weight || !mean || !rstd)
        return gl::fail(GPTLAB_EINVAL, "layernorm_backward: null pointer");
    if (int rc = check_sizes("layernorm_backward", rows, c)) return rc;
    gl::DeviceGuard device;
    if (int rc = device.bind(dx, "layernorm_backward")) return rc;
    const dim3 grid(unsigned(gl::ceil_div(rows, ROWS_PER_BLOCK))), block(gl::WARP, ROWS_PER_BLOCK);
    GL_LAUNCH(layernorm_backward_dx_kernel, grid, block, 0, stream, dx, dy, x, weight, mean, rstd,
              rows, int(c));
    if (int rc = gl::check_launch("layernorm_backward (dx)")) return rc;

    float *partials = static_cast<float *>(workspace);
    const int64_t nchunks = gl::num_chunks(rows);
    const dim3 pgrid(unsigned(nchunks), unsigned(gl::ceil_div(c, gl::COLS)));
    const size_t smem = 2 * gl::SLICES * gl::COLS * sizeof(float);
    GL_LAUNCH(layernorm_backward_params_kernel, pgrid, dim3(gl::COLS, gl::SLICES), smem, stream,
              partials, dy, x, mean, rstd, rows, int(c));
    if (int rc = gl::check_launch("layernorm_backward (partial sums)")) return rc;

    const dim3 sgrid(unsigned(gl::ceil_div(c, gl::SUM_THREADS)));
    GL_LAUNCH(gl::sum_chunks_kernel<gl::SUM_THREADS>, sgrid, dim3(gl::SUM_THREADS), 0, stream,
              dweight, partials, nchunks, int(c), 2 * c);
    if (dbias) {
        GL_LAUNCH(gl::sum_chunks_kernel<gl::SUM_THREADS>, sgrid, dim3(gl::SUM_THREADS), 0, stream,
                  dbias, partials + c, nchunks, int(c), 2 * c);
    }
    return gl::check_launch("layernorm_backward (sums)");
}
