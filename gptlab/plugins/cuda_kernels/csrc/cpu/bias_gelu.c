/* Bias + GELU, forward and backward, float32: y = gelu(x + bias) with the exact (erf) GELU of
 * Hendrycks & Gimpel 2016, gelu(u) = u * Phi(u), Phi(u) = (1 + erf(u / sqrt 2)) / 2 the standard
 * normal CDF (what F.gelu computes by default); gelu'(u) = Phi(u) + u * phi(u), phi the normal
 * density exp(-u^2 / 2) / sqrt(2 pi).
 *
 * erf is the rational approximation erf(z) = z P(z^2) / Q(z^2), z clamped to [-4, 4] (outside,
 * erf is +-1 in float32), of Eigen's generic_fast_erf_float (the one XLA and TensorFlow use):
 * no exp and one division, about half the work of an exp-based erf. Measured in float32 here,
 * |error| <= 4e-7 on erf, 2.5e-7 on Phi: the level of torch's float32 gelu (Abramowitz & Stegun
 * 7.1.26, 1.5e-7 plus rounding); like it, Phi(u) loses relative accuracy for u << 0, where it
 * is a difference of nearly equal numbers (the gelu there is below 1e-3 in magnitude). The
 * backward adds one exp2 for phi, its argument kept in exp2's range by clamping z to
 * [-9, 9] (u phi(u) < 1e-16 beyond).
 *
 * The bias is added in registers (x + bias is never stored), the backward saves nothing but x
 * and recomputes u; dbias is summed per fixed chunk of rows into the caller's workspace and the
 * chunks added in order (rowwise.h): deterministic for any number of threads.
 *
 * Reference: F.gelu(x + bias) / autograd in float64 (tests/kernels/test_rowwise_kernels.py).
 * Check:     pytest tests/kernels/test_rowwise_kernels.py -k bias_gelu
 * Benchmark: gpt bench ops --ops linear_gelu  (vs F.gelu(linear(x)), same run)
 * CUDA twin: ../cuda/bias_gelu.cu
 */
#include "rowwise.h"

#define SQRT1_2 0.7071067811865476f
#define INV_SQRT_2PI 0.3989422804014327f

typedef struct {
    float *y, *dx, *dbias, *ws;
    const float *x, *bias, *dy;
    int64_t rows, f, fpad, chunk;
} gelu_ctx;

/* Phi(u) from z = u / sqrt 2 already clamped to [-4, 4]. */
GL_INLINE rv normal_cdf(rv z) {
    const rv t = z * z;
    rv p = rset1(-2.72614225801306e-10f);
    p = p * t + rset1(2.77068142495902e-08f);
    p = p * t + rset1(-2.10102402082508e-06f);
    p = p * t + rset1(-5.69250639462346e-05f);
    p = p * t + rset1(-7.34990630326855e-04f);
    p = p * t + rset1(-2.95459980854025e-03f);
    p = p * t + rset1(-1.60960333262415e-02f);
    rv q = rset1(-1.45660718464996e-05f);
    q = q * t + rset1(-2.13374055278905e-04f);
    q = q * t + rset1(-1.68282697438203e-03f);
    q = q * t + rset1(-7.37332916720468e-03f);
    q = q * t + rset1(-1.42647390514189e-02f);
    return rset1(0.5f) + rset1(0.5f) * (z * p / q);
}

GL_INLINE rv gelu(rv u) { return u * normal_cdf(rclamp(u * SQRT1_2, -4.f, 4.f)); }

GL_INLINE rv gelu_grad(rv u) {
    const rv z = rclamp(u * SQRT1_2, -9.f, 9.f); /* exp2's argument stays >= -117 */
    const rv pdf = vexp2_in_range(z * z * -LOG2E) * INV_SQRT_2PI;
    return normal_cdf(rclamp(z, -4.f, 4.f)) + u * pdf;
}

static int gelu_fwd_chunk(void *vctx, int64_t item, int thread) {
    (void)thread;
    const gelu_ctx *k = (const gelu_ctx *)vctx;
    const int64_t f = k->f, nv = f / RVL * RVL, rem = f - nv;
    const int64_t r0 = item * k->chunk, r1 = r0 + k->chunk < k->rows ? r0 + k->chunk : k->rows;
    const float *restrict b = k->bias;
    const rv bt = rem ? rload_part(b + nv, rem, 0.f) : rset1(0.f);
    for (int64_t row = r0; row < r1; row++) {
        const float *restrict x = k->x + row * f;
        float *restrict y = k->y + row * f;
        for (int64_t j = 0; j < nv; j += RVL) rstore(y + j, gelu(rload(x + j) + rload(b + j)));
        if (rem) rstore_part(y + nv, gelu(rload_part(x + nv, rem, 0.f) + bt), rem);
    }
    return GPTLAB_OK;
}

/* dx for one chunk of rows, and (has_dbias) the chunk's partial dbias row in the workspace
 * (fpad columns: the tail is a whole vector there, its extra lanes adding dy = 0). */
GL_INLINE void gelu_bwd_rows(const int has_dbias, const gelu_ctx *k, int64_t item) {
    const int64_t f = k->f, nv = f / RVL * RVL, rem = f - nv;
    const int64_t r0 = item * k->chunk, r1 = r0 + k->chunk < k->rows ? r0 + k->chunk : k->rows;
    const float *restrict b = k->bias;
    float *restrict dbp = has_dbias ? k->ws + item * k->fpad : NULL;
    if (has_dbias) memset(dbp, 0, (size_t)k->fpad * sizeof(float));
    const rv bt = rem ? rload_part(b + nv, rem, 0.f) : rset1(0.f);
    for (int64_t row = r0; row < r1; row++) {
        const float *restrict x = k->x + row * f;
        const float *dy = k->dy + row * f;
        float *dx = k->dx + row * f; /* may alias dy: each vector is read before it is written */
        for (int64_t j = 0; j < nv; j += RVL) {
            rv g = rload(dy + j) * gelu_grad(rload(x + j) + rload(b + j));
            rstore(dx + j, g);
            if (has_dbias) rstore(dbp + j, rload(dbp + j) + g);
        }
        if (rem) {
            rv g = rload_part(dy + nv, rem, 0.f) * gelu_grad(rload_part(x + nv, rem, 0.f) + bt);
            rstore_part(dx + nv, g, rem);
            if (has_dbias) rstore(dbp + nv, rload(dbp + nv) + g);
        }
    }
}

static int gelu_bwd_chunk(void *vctx, int64_t item, int thread) {
    (void)thread;
    const gelu_ctx *k = (const gelu_ctx *)vctx;
    if (k->dbias) gelu_bwd_rows(1, k, item);
    else gelu_bwd_rows(0, k, item);
    return GPTLAB_OK;
}

static int check(const char *fn, int64_t rows, int64_t f) {
    if (rows < 1 || f < 1)
        return gl_fail(GPTLAB_EINVAL, "%s: sizes must be >= 1 (rows=%lld f=%lld)", fn,
                       (long long)rows, (long long)f);
    return GPTLAB_OK;
}

int gptlab_bias_gelu_forward_f32(float *y, const float *x, const float *bias, int64_t rows,
                                 int64_t f, void *stream, int num_threads) {
    (void)stream;
    gl_clear_error();
    if (!y || !x || !bias) return gl_fail(GPTLAB_EINVAL, "bias_gelu_forward: null pointer");
    int rc = check("bias_gelu_forward", rows, f);
    if (rc) return rc;
    const int64_t chunk = gl_chunk_rows(rows);
    gelu_ctx k = {.y = y, .x = x, .bias = bias, .rows = rows, .f = f, .chunk = chunk};
    return gl_parallel_for((rows + chunk - 1) / chunk, num_threads, gelu_fwd_chunk, &k);
}

int64_t gptlab_bias_gelu_backward_workspace_size(int64_t rows, int64_t f) {
    if (rows < 1 || f < 1) return 0;
    return gl_num_chunks(rows) * round_up(f, RVL) * (int64_t)sizeof(float);
}

int gptlab_bias_gelu_backward_f32(float *dx, float *dbias, void *workspace, const float *dy,
                                  const float *x, const float *bias, int64_t rows, int64_t f,
                                  void *stream, int num_threads) {
    (void)stream;
    gl_clear_error();
    if (!dx || !dy || !x || !bias || (dbias && !workspace))
        return gl_fail(GPTLAB_EINVAL, "bias_gelu_backward: null pointer");
    int rc = check("bias_gelu_backward", rows, f);
    if (rc) return rc;
    const int64_t chunk = gl_chunk_rows(rows), nchunks = gl_num_chunks(rows);
    gelu_ctx k = {.dx = dx, .dbias = dbias, .ws = (float *)workspace, .x = x, .bias = bias,
                  .dy = dy, .rows = rows, .f = f, .fpad = round_up(f, RVL), .chunk = chunk};
    rc = gl_parallel_for(nchunks, num_threads, gelu_bwd_chunk, &k);
    if (rc) return rc;
    if (dbias) gl_sum_chunks(dbias, k.ws, nchunks, f, k.fpad);
    return GPTLAB_OK;
}
