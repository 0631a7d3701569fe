/* LayerNorm over the last dim (Ba, Kiros & Hinton 2016), forward and backward, float32.
 *
 * Forward, per row of x (rows, c): mean = sum(x) / c, var = sum((x - mean)^2) / c (biased, as
 * in the paper and F.layer_norm), rstd = 1 / sqrt(var + eps), y = (x - mean) * rstd * w + b.
 * Two passes over a row that stays in L1 (a row is c floats): the variance is summed around the
 * mean, never as E[x^2] - mean^2, which cancels catastrophically when |mean| >> std. mean and
 * rstd are written (one float each per row) for the backward.
 *
 * Backward, with xhat = (x - mean) * rstd and g = dy * w:
 *   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))       (per row, two passes)
 *   dweight = sum over rows of dy * xhat, dbias = sum over rows of dy
 * The column sums are accumulated per fixed chunk of rows (rowwise.h) into the caller's
 * workspace and the chunks added in order afterwards: deterministic for any number of threads.
 *
 * Rows are native-width vectors (rowwise.h) plus one partial vector whose extra lanes are
 * filled so that they add nothing (x filled with the mean gives xhat = 0; dy filled with 0).
 * Work items are the chunks of rows, handed out to the threads dynamically.
 *
 * Reference: F.layer_norm / autograd in float64 (tests/kernels/test_rowwise_kernels.py).
 * Check:     pytest tests/kernels/test_rowwise_kernels.py -k layer_norm
 * Benchmark: gpt bench ops --ops layer_norm  (vs F.layer_norm and the hand-written
 *            gptlab.nn.LayerNorm, same run)
 * CUDA twin: ../cuda/layernorm.cu
 */
#include "rowwise.h"

typedef struct {
    float *y, *mean_out, *rstd_out, *dx, *dweight, *dbias, *ws;
    const float *x, *weight, *bias, *dy, *mean, *rstd;
    int64_t rows, c, cpad, chunk;
    float eps;
} ln_ctx;

/* y row = (x - mean) * rstd * w (+ b); has_bias is a compile-time constant at each call. */
GL_INLINE void ln_store_row(const int has_bias, float *restrict y, const float *restrict x,
                            const float *restrict w, const float *restrict b, int64_t c,
                            float mean, float rstd) {
    const int64_t nv = c / RVL * RVL, rem = c - nv;
    const rv vm = rset1(mean), vr = rset1(rstd);
    for (int64_t j = 0; j < nv; j += RVL) {
        rv v = (rload(x + j) - vm) * vr * rload(w + j);
        if (has_bias) v += rload(b + j);
        rstore(y + j, v);
    }
    if (rem) {
        rv v = (rload_part(x + nv, rem, mean) - vm) * vr * rload_part(w + nv, rem, 0.f);
        if (has_bias) v += rload_part(b + nv, rem, 0.f);
        rstore_part(y + nv, v, rem);
    }
}

static int ln_fwd_chunk(void *vctx, int64_t item, int thread) {
    (void)thread;
    const ln_ctx *k = (const ln_ctx *)vctx;
    const int64_t c = k->c, nv = c / RVL * RVL, rem = c - nv;
    const int64_t r0 = item * k->chunk, r1 = r0 + k->chunk < k->rows ? r0 + k->chunk : k->rows;
    for (int64_t row = r0; row < r1; row++) {
        const float *restrict x = k->x + row * c;
        /* two accumulators: two independent add chains through the row */
        rv s0 = rset1(0.f), s1 = rset1(0.f);
        int64_t j = 0;
        for (; j + 2 * RVL <= nv; j += 2 * RVL) { s0 += rload(x + j); s1 += rload(x + j + RVL); }
        if (j < nv) s0 += rload(x + j);
        if (rem) s1 += rload_part(x + nv, rem, 0.f);
        const float mean = rsum(s0 + s1) / (float)c;
        const rv vm = rset1(mean);
        rv q0 = rset1(0.f), q1 = rset1(0.f);
        for (j = 0; j + 2 * RVL <= nv; j += 2 * RVL) {
            rv d0 = rload(x + j) - vm, d1 = rload(x + j + RVL) - vm;
            q0 += d0 * d0;
            q1 += d1 * d1;
        }
        if (j < nv) { rv d = rload(x + j) - vm; q0 += d * d; }
        if (rem) { rv d = rload_part(x + nv, rem, mean) - vm; q1 += d * d; }
        const float var = rsum(q0 + q1) / (float)c;
        const float rstd = 1.f / sqrtf(var + k->eps);
        if (k->bias) ln_store_row(1, k->y + row * c, x, k->weight, k->bias, c, mean, rstd);
        else ln_store_row(0, k->y + row * c, x, k->weight, NULL, c, mean, rstd);
        k->mean_out[row] = mean;
        k->rstd_out[row] = rstd;
    }
    return GPTLAB_OK;
}

/* One chunk of rows: dx, and the chunk's partial dweight (and dbias) rows in the workspace
 * (padded to cpad columns, so the tail is a whole vector there). The partial rows are updated
 * row by row from L1: keeping them in registers over blocks of rows (two phases, by columns)
 * measured slower here; at these sizes the backward is bound by memory (x, dy, dx), not by
 * arithmetic. */
GL_INLINE void ln_bwd_rows(const int has_dbias, const ln_ctx *k, int64_t item) {
    const int64_t c = k->c, nv = c / RVL * RVL, rem = c - nv;
    const int64_t r0 = item * k->chunk, r1 = r0 + k->chunk < k->rows ? r0 + k->chunk : k->rows;
    const float *restrict w = k->weight;
    float *restrict dwp = k->ws + item * 2 * k->cpad, *restrict dbp = dwp + k->cpad;
    memset(dwp, 0, (size_t)(2 * k->cpad) * sizeof(float));
    const rv wt = rem ? rload_part(w + nv, rem, 0.f) : rset1(0.f);
    for (int64_t row = r0; row < r1; row++) {
        const float *restrict x = k->x + row * c, *restrict dy = k->dy + row * c;
        float *restrict dx = k->dx + row * c;
        const float mean = k->mean[row], rstd = k->rstd[row];
        const rv vm = rset1(mean), vr = rset1(rstd);
        rv sg = rset1(0.f), sgx = rset1(0.f);
        for (int64_t j = 0; j < nv; j += RVL) {
            rv xh = (rload(x + j) - vm) * vr, d = rload(dy + j), g = d * rload(w + j);
            sg += g;
            sgx += g * xh;
            rstore(dwp + j, rload(dwp + j) + d * xh);
            if (has_dbias) rstore(dbp + j, rload(dbp + j) + d);
        }
        if (rem) {
            rv xh = (rload_part(x + nv, rem, mean) - vm) * vr, d = rload_part(dy + nv, rem, 0.f);
            rv g = d * wt;
            sg += g;
            sgx += g * xh;
            rstore(dwp + nv, rload(dwp + nv) + d * xh);
            if (has_dbias) rstore(dbp + nv, rload(dbp + nv) + d);
        }
        const rv a = rset1(rsum(sg) / (float)c), b = rset1(rsum(sgx) / (float)c);
        for (int64_t j = 0; j < nv; j += RVL) {
            rv xh = (rload(x + j) - vm) * vr, g = rload(dy + j) * rload(w + j);
            rstore(dx + j, vr * (g - a - xh * b));
        }
        if (rem) {
            rv xh = (rload_part(x + nv, rem, mean) - vm) * vr;
            rv g = rload_part(dy + nv, rem, 0.f) * wt;
            rstore_part(dx + nv, vr * (g - a - xh * b), rem);
        }
    }
}

static int ln_bwd_chunk(void *vctx, int64_t item, int thread) {
    (void)thread;
    const ln_ctx *k = (const ln_ctx *)vctx;
    if (k->dbias) ln_bwd_rows(1, k, item);
    else ln_bwd_rows(0, k, item);
    return GPTLAB_OK;
}

static int check(const char *fn, int64_t rows, int64_t c) {
    if (rows < 1 || c < 1)
        return gl_fail(GPTLAB_EINVAL, "%s: sizes must be >= 1 (rows=%lld c=%lld)", fn,
                       (long long)rows, (long long)c);
    return GPTLAB_OK;
}

int gptlab_layernorm_forward_f32(float *y, float *mean, float *rstd, const float *x,
                                 const float *weight, const float *bias, int64_t rows,
                                 int64_t c, float eps, void *stream, int num_threads) {
    (void)stream;
    gl_clear_error();
    if (!y || !mean || !rstd || !x || !weight)
        return gl_fail(GPTLAB_EINVAL, "layernorm_forward: null pointer");
    int rc = check("layernorm_forward", rows, c);
    if (rc) return rc;
    if (!(eps >= 0.f) || !isfinite(eps))
        return gl_fail(GPTLAB_EINVAL, "layernorm_forward: eps must be finite and >= 0, got %g",
                       eps);
    const int64_t chunk = gl_chunk_rows(rows);
    ln_ctx k = {.y = y, .mean_out = mean, .rstd_out = rstd, .x = x, .weight = weight, .bias = bias,
                .rows = rows, .c = c, .chunk = chunk, .eps = eps};
    return gl_parallel_for((rows + chunk - 1) / chunk, num_threads, ln_fwd_chunk, &k);
}

int64_t gptlab_layernorm_backward_workspace_size(int64_t rows, int64_t c) {
    if (rows < 1 || c < 1) return 0;
    return gl_num_chunks(rows) * 2 * round_up(c, RVL) * (int64_t)sizeof(float);
}

int gptlab_layernorm_backward_f32(float *dx, float *dweight, float *dbias, void *workspace,
                                  const float *dy, const float *x, const float *weight,
                                  const float *mean, const float *rstd, int64_t rows, int64_t c,
                                  void *stream, int num_threads) {
    (void)stream;
    gl_clear_error();
    if (!dx || !dweight || !workspace || !dy || !x || !weight || !mean || !rstd)
        return gl_fail(GPTLAB_EINVAL, "layernorm_backward: null pointer");
    int rc = check("layernorm_backward", rows, c);
    if (rc) return rc;
    const int64_t chunk = gl_chunk_rows(rows), nchunks = gl_num_chunks(rows);
    const int64_t cpad = round_up(c, RVL);
    ln_ctx k = {.dx = dx, .dweight = dweight, .dbias = dbias, .ws = (float *)workspace,
                .x = x, .weight = weight, .dy = dy, .mean = mean, .rstd = rstd, .rows = rows,
                .c = c, .cpad = cpad, .chunk = chunk};
    rc = gl_parallel_for(nchunks, num_threads, ln_bwd_chunk, &k);
    if (rc) return rc;
    gl_sum_chunks(dweight, k.ws, nchunks, c, 2 * cpad);
    if (dbias) gl_sum_chunks(dbias, k.ws + cpad, nchunks, c, 2 * cpad);
    return GPTLAB_OK;
}
